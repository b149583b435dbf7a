"""The PostgreSQL backends against a real server (see the pg_url fixture): log, record, snapshots, lease, status."""
from __future__ import annotations

import copy
import threading
import time
import uuid

import pytest
import torch

from selfheal_core import HealConfig, SelfHealer
from selfheal_core.storage import DuplicateFeedback, StorageUnavailable, decode_targets, encode_target, open_storage
from selfheal_core.storage.base import ROW_OVERHEAD

pytest.importorskip("psycopg")


@pytest.fixture()
def model() -> str:
    """A fresh model name: tests share one database, rows are per model."""
    return f"m-{uuid.uuid4().hex[:12]}"


def storage(url, model, tmp_path=None):
    return open_storage(model, tmp_path or "/nonexistent-not-used", url)


def append(log, x, labels, served=None, pids=None):
    return log.append(x, [encode_target(torch.tensor(v)) for v in labels],
                      [None if s is None else encode_target(torch.tensor(s)) for s in (served or [None] * len(labels))],
                      [None] * len(labels), pids)


def test_log_round_trip_duplicates_and_models_apart(pg_url, model):
    log = storage(pg_url, model).log
    x = torch.randn(5, 1, 8, 8)
    seqs = append(log, x, [0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [f"id{i}" for i in range(5)])
    assert seqs == [1, 2, 3, 4, 5]
    with pytest.raises(DuplicateFeedback, match="already"):
        append(log, x[:2], [1, 2], pids=["new", "id3"])
    log.set_status([5], "quarantined")
    log.close()
    reopened = storage(pg_url, model).log
    [rows] = list(reopened.entries())
    assert torch.equal(rows.x, x) and decode_targets(rows.target, True).tolist() == [0, 1, 2, 3, 4]
    assert rows.seq == seqs and rows.status == ["new"] * 4 + ["quarantined"]
    assert [len(r.seq) for r in reopened.entries(after=2, batch=2)] == [2, 1]
    assert reopened.answered(["id1", "new", "zz"]) == ["id1"], "the failed append wrote nothing"
    assert reopened.stats()["entries"] == 5 and reopened.stats()["last_seq"] == 5
    other = storage(pg_url, model + "-other").log
    assert other.stats()["entries"] == 0 and other.answered(["id1"]) == []
    assert append(other, x[:1], [3], pids=["id1"]) == [1]


def test_concurrent_appenders_lose_nothing_and_a_tailing_reader_skips_nothing(pg_url, model):
    """Writers in parallel (own connections, like intakes on several machines); a reader tailing by
    seq while they write must see every row exactly once: numbers follow commit order."""
    writers, batches = 4, 25
    seen: list[int] = []
    labels: list[int] = []
    done = threading.Event()

    def write(w: int) -> None:
        log = storage(pg_url, model).log
        for b in range(batches):
            append(log, torch.full((2, 3), float(w)), [w, w], pids=[f"w{w}-{b}-a", f"w{w}-{b}-b"])
        log.close()

    def tail() -> None:
        log, after = storage(pg_url, model).log, 0
        while True:
            finished = done.is_set()
            for rows in log.entries(after=after, batch=7):
                seen.extend(rows.seq)
                labels.extend(decode_targets(rows.target, True).tolist())
                after = rows.seq[-1]
            if finished:
                break
        log.close()

    reader = threading.Thread(target=tail)
    reader.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join(timeout=60)
    n = writers * batches * 2
    assert seen == list(range(1, n + 1))
    assert sorted(labels) == sorted([w for w in range(writers) for _ in range(batches * 2)])


def test_prediction_record_is_bounded_shared_and_waited_for(pg_url, model):
    row = 2 * 3 * 4 + 4 + ROW_OVERHEAD
    rec = open_storage(model, "/nonexistent-not-used", pg_url, capacity=100, record_bytes=300 * row).open_record()
    x = torch.randn(600, 2, 3)
    ids = rec.add(x, torch.arange(600) % 10, torch.full((600,), 0.5))
    assert len(rec) == 300, "pruned to the byte budget"
    assert rec.stats()["bytes"] <= rec.max_bytes and rec.pruned == 300
    other_worker = storage(pg_url, model).predictions
    found, unknown, _ = other_worker.lookup([ids[-1], "0" * 32], wait_s=5)
    assert torch.equal(found[ids[-1]].x, x[-1]) and int(found[ids[-1]].served) == 599 % 10
    assert unknown == ["0" * 32]
    assert storage(pg_url, model + "-other").predictions.get([ids[-1]]) == {}
    # a week old, within the retention period and the budget: resolves from PostgreSQL
    fresh = open_storage(model + "-week", "/nonexistent-not-used", pg_url, capacity=64).open_record()
    week_old = fresh.add(x[:10], torch.arange(10), None, now=time.time() - 7 * 86400)
    ancient = fresh.add(x[:5], torch.arange(5), None, now=time.time() - 31 * 86400)
    for _ in range(5):
        fresh.add(torch.randn(64, 2, 3), torch.zeros(64), None)
    fresh.flush()
    fresh.prune()
    found, unknown, _ = storage(pg_url, model + "-week").predictions.lookup(week_old + ancient, wait_s=1)
    assert set(found) == set(week_old) and set(unknown) == set(ancient)
    x_now, times = storage(pg_url, model + "-week").predictions.newest(3)  # the traffic a late label is judged by
    assert x_now.shape == (3, 2, 3) and min(times) > time.time() - 3600


def test_snapshots_leases_and_status_live_in_postgres(pg_url, model, tmp_path):
    a, b = storage(pg_url, model, tmp_path), storage(pg_url, model, tmp_path)
    assert [a.snapshots.save({"w": torch.full((2,), float(i))}, {"n": i}, private={"n": i}) for i in range(3)] \
        == [1, 2, 3]
    assert b.snapshots.load_private(3) == {"n": 2} and b.snapshots.load_resumable()[2] == {"n": 2}
    state, meta = b.snapshots.load_latest()
    assert meta["version"] == 3 and meta["parent"] == 2 and torch.equal(state["w"], torch.full((2,), 2.0))
    for i in range(6):
        a.snapshots.save({"w": torch.zeros(1)})
    assert b.snapshots.versions() == [5, 6, 7, 8, 9]
    assert a.lease("learner").try_acquire() and not b.lease("learner").try_acquire()
    a.lease("learner").release()
    assert b.lease("learner").try_acquire()
    a.status.put("worker-1", {"drift": {"detected": True}, "t": torch.ones(3)})
    got = b.status.read()["worker-1"]
    assert got["drift"]["detected"] and torch.equal(got["t"], torch.ones(3))
    assert not list(tmp_path.iterdir()), "nothing on the filesystem"
    for s in (a, b):
        s.close()


def test_a_restarted_healer_replays_the_postgres_log(pg_url, model, demo_model, reference, digits):
    from selfheal_bench.data import corrupt, resample

    x_ref, y_ref = reference
    _, _, x_te, y_te = digits
    x, y = resample(x_te, y_te, 40, seed=3)
    x = corrupt(x, "rotate", 4, seed=3)
    config = HealConfig.from_dict({"learn": {"update_every": 8}})
    first = SelfHealer(copy.deepcopy(demo_model), x_ref, config, reference_labels=y_ref,
                       feedback_log=storage(pg_url, model).log)
    first.feedback(x, y)
    assert first.status()["feedback_log"]["absorbed"] == 40
    again = SelfHealer(copy.deepcopy(demo_model), x_ref, config, reference_labels=y_ref,
                       feedback_log=storage(pg_url, model).log)
    again.resume()
    assert again.status()["feedback_log"]["absorbed"] == 40
    with torch.no_grad():
        assert torch.allclose(again.model(x), first.model(x), atol=1e-5), "same log, same learning"


def test_reconnects_after_the_server_restarts(model):
    from selfheal_bench import pgserver

    if pgserver.available():
        pytest.skip(pgserver.available())
    with pgserver.PostgresServer() as server:
        log = storage(server.url, model).log
        append(log, torch.zeros(1, 3), [1], pids=["a"])
        server.restart()
        with pytest.raises(StorageUnavailable):  # the old connection died with the server: this call fails ...
            append(log, torch.zeros(1, 3), [2], pids=["b"])
        assert append(log, torch.zeros(1, 3), [2], pids=["b"]) == [2]  # ... the next reconnects
        assert log.stats()["entries"] == 2


def test_a_lease_whose_session_the_server_ended_is_not_held_any_more(pg_url, model):
    """The lease trusted its connection object: after the server ended the session (a network drop,
    an operator), a second learner took the lock and both believed they held it (issue 26)."""
    import psycopg

    a, b = storage(pg_url, model), storage(pg_url, model)
    lease_a, lease_b = a.lease("learner"), b.lease("learner")
    assert lease_a.try_acquire() and not lease_b.try_acquire()
    pid = lease_a._conn.info.backend_pid
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert lease_b.try_acquire(), "the lock was freed with the session"
    assert not lease_a.try_acquire(), "a learner whose session ended does not hold the lease"
    for s in (a, b):
        s.close()
