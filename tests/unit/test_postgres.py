"""The PostgreSQL feedback log and prediction record against a real server (see the pg_url fixture)."""
from __future__ import annotations

import threading
import uuid

import pytest
import torch

from selfheal_core import HealConfig, SelfHealer
from selfheal_core.feedback_log import DuplicateFeedback, open_feedback_log
from selfheal_core.recent import open_prediction_record

pytest.importorskip("psycopg")


@pytest.fixture()
def model() -> str:
    """A fresh model name: tests share one database, rows are per model."""
    return f"m-{uuid.uuid4().hex[:12]}"


def test_log_round_trip_duplicates_and_models_apart(pg_url, model):
    log = open_feedback_log(pg_url, model)
    x = torch.randn(5, 1, 8, 8)
    seqs = log.append(x, torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 1, 2, 3, 0]),
                      torch.tensor([False, False, False, False, True]), [f"id{i}" for i in range(5)])
    assert seqs == [1, 2, 3, 4, 5]
    with pytest.raises(DuplicateFeedback, match="already"):
        log.append(x[:2], torch.tensor([1, 2]), None, torch.zeros(2, dtype=torch.bool), ["new", "id3"])
    log.close()
    reopened = open_feedback_log(pg_url, model)
    [rows] = list(reopened.entries())
    assert torch.equal(rows.x, x) and rows.y.tolist() == [0, 1, 2, 3, 4] and rows.seq == seqs
    assert rows.quarantined.tolist() == [False] * 4 + [True] and rows.served.tolist() == [0, 1, 2, 3, 0]
    assert [len(r.y) for r in reopened.entries(after=2, batch=2)] == [2, 1]
    assert reopened.answered(["id1", "new", "zz"]) == ["id1"], "the failed append wrote nothing"
    assert reopened.stats() | {"last_time": None} == {"entries": 5, "learned": 4, "quarantined": 1,
                                                      "last_seq": 5, "last_time": None}
    other = open_feedback_log(pg_url, model + "-other")
    assert other.stats()["entries"] == 0 and other.answered(["id1"]) == []
    assert other.append(x[:1], torch.tensor([3]), None, torch.zeros(1, dtype=torch.bool), ["id1"]) == [1]


def test_concurrent_appenders_lose_nothing_and_a_tailing_reader_skips_nothing(pg_url, model):
    """Writers in parallel (own connections, like workers and replicas); a reader tailing by seq
    while they write must see every row exactly once: numbers follow commit order."""
    writers, batches = 4, 25
    seen: list[int] = []
    labels: list[int] = []
    done = threading.Event()

    def write(w: int) -> None:
        log = open_feedback_log(pg_url, model)
        for b in range(batches):
            log.append(torch.full((2, 3), float(w)), torch.tensor([w, w]), None, torch.zeros(2, dtype=torch.bool),
                       [f"w{w}-{b}-a", f"w{w}-{b}-b"])
        log.close()

    def tail() -> None:
        log, after = open_feedback_log(pg_url, model), 0
        while True:
            finished = done.is_set()
            for rows in log.entries(after=after, batch=7):
                seen.extend(rows.seq)
                labels.extend(rows.y.tolist())
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


def test_prediction_record_is_bounded_and_shared(pg_url, model):
    rec = open_prediction_record(pg_url, capacity=300, model=model)
    x = torch.randn(600, 2, 3)
    ids = rec.add(x, torch.arange(600) % 10, torch.full((600,), 0.5))
    assert len(rec) == 300
    assert rec.get(ids[:1]) == {}
    other_worker = open_prediction_record(pg_url, capacity=300, model=model)
    got = other_worker.get([ids[-1]])[ids[-1]]
    assert torch.equal(got[0], x[-1]) and got[1] == 599 % 10 and got[2] == 0.5
    assert open_prediction_record(pg_url, capacity=300, model=model + "-other").get([ids[-1]]) == {}
    rec.close()
    other_worker.close()


def test_a_restarted_healer_replays_the_postgres_log(pg_url, model, demo_model, reference, digits):
    from selfheal_bench.data import corrupt, resample

    import copy

    x_ref, y_ref = reference
    _, _, x_te, y_te = digits
    x, y = resample(x_te, y_te, 40, seed=3)
    x = corrupt(x, "rotate", 4, seed=3)
    config = HealConfig.from_dict({"learn": {"update_every": 8}})
    first = SelfHealer(copy.deepcopy(demo_model), x_ref, config, y_ref,
                       feedback_log=open_feedback_log(pg_url, model))
    first.feedback(x, y)
    assert first.status()["feedback_log"]["absorbed"] == 40
    again = SelfHealer(copy.deepcopy(demo_model), x_ref, config, y_ref,
                       feedback_log=open_feedback_log(pg_url, model))
    again.resume()
    assert again.status()["feedback_log"]["absorbed"] == 40
    with torch.no_grad():
        assert torch.allclose(again.model(x), first.model(x), atol=1e-5), "same log, same learning"


def test_reconnects_after_the_server_restarts(model):
    from selfheal_bench import pgserver

    if pgserver.available():
        pytest.skip(pgserver.available())
    with pgserver.PostgresServer() as server:
        log = open_feedback_log(server.url, model)
        no = torch.zeros(1, dtype=torch.bool)
        log.append(torch.zeros(1, 3), torch.tensor([1]), None, no, ["a"])
        server.restart()
        with pytest.raises(Exception):  # the old connection died with the server: this call fails ...
            log.append(torch.zeros(1, 3), torch.tensor([2]), None, no, ["b"])
        assert log.append(torch.zeros(1, 3), torch.tensor([2]), None, no, ["b"]) == [2]  # ... the next reconnects
        assert log.stats()["entries"] == 2
