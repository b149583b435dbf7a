"""Storage on one machine: the feedback log, the prediction record, snapshots, leases, status records."""
from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time

import pytest
import torch

from selfheal_core.storage import (DuplicateFeedback, FileLease, FileSnapshotStore, FileStatusBoard,
                                   SQLiteFeedbackLog, SQLitePredictionRecord, StorageFull, StorageUnavailable, decode_targets,
                                   encode_target, open_storage)
from selfheal_core.storage.base import ROW_OVERHEAD


def state(v: float) -> dict:
    return {"w": torch.full((3,), v), "n": int(v)}


def append(log, x, labels, served=None, pids=None):
    return log.append(x, [encode_target(torch.tensor(v)) for v in labels],
                      [None if s is None else encode_target(torch.tensor(s)) for s in (served or [None] * len(labels))],
                      [None] * len(labels), pids)


# ---------------------------------------------------------------------- feedback log
def test_log_round_trip_survives_reopen(tmp_path):
    path = tmp_path / "fb.sqlite"
    log = SQLiteFeedbackLog(path)
    x = torch.randn(5, 1, 8, 8)
    seqs = append(log, x, [0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [f"id{i}" for i in range(5)])
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    log.set_status(seqs[-1:], "quarantined")
    log.close()
    reopened = SQLiteFeedbackLog(path)
    [rows] = list(reopened.entries(after=0))
    assert torch.equal(rows.x, x) and decode_targets(rows.target, True).tolist() == [0, 1, 2, 3, 4]
    assert rows.seq == seqs and rows.status == ["new"] * 4 + ["quarantined"] and rows.served[1] == "1"
    assert [len(r.seq) for r in reopened.entries(after=seqs[1], batch=2)] == [2, 1]
    assert reopened.stats()["by_status"] == {"new": 4, "quarantined": 1} and reopened.stats()["last_seq"] == seqs[-1]
    assert reopened.by_seq([seqs[2], seqs[0]]).seq == [seqs[0], seqs[2]]


def test_log_holds_regression_targets_and_integer_inputs():
    log = SQLiteFeedbackLog()
    log.append(torch.tensor([[1, 2, 3]], dtype=torch.int64), [encode_target(torch.tensor([1.5, -2.0]))], [None], [None])
    [rows] = list(log.entries())
    assert rows.x.dtype == torch.int64 and rows.x.tolist() == [[1, 2, 3]]
    assert decode_targets(rows.target, False).tolist() == [[1.5, -2.0]]


def test_log_duplicate_id_writes_nothing():
    log = SQLiteFeedbackLog()
    append(log, torch.zeros(1, 3), [1], pids=["a"])
    with pytest.raises(DuplicateFeedback, match="already"):
        append(log, torch.zeros(2, 3), [1, 2], pids=["b", "a"])
    assert log.stats()["entries"] == 1 and log.answered(["a", "b"]) == ["a"]


def test_schema_1_logs_are_migrated(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE feedback (seq INTEGER PRIMARY KEY AUTOINCREMENT, pid TEXT UNIQUE, label INTEGER NOT NULL,"
               " served INTEGER, source TEXT NOT NULL, status TEXT NOT NULL, time REAL NOT NULL, shape TEXT NOT NULL,"
               " input BLOB NOT NULL)")
    db.execute("INSERT INTO feedback VALUES (7, 'p', 3, 2, 'api', 'quarantine', 1.0, '[2]', ?)",
               (torch.tensor([1.0, 2.0]).numpy().tobytes(),))
    db.commit()
    db.close()
    [rows] = list(SQLiteFeedbackLog(path).entries())
    assert rows.seq == [7] and rows.target == ["3"] and rows.served == ["2"] and rows.status == ["quarantined"]
    assert rows.x.tolist() == [[1.0, 2.0]]


def test_files_holding_inputs_and_labels_are_private(tmp_path):
    storage = open_storage("m", tmp_path)
    append(storage.log, torch.zeros(1, 2), [1])
    storage.predictions.add(torch.zeros(1, 2), torch.tensor([1]), torch.tensor([0.5]))
    storage.predictions.flush()
    storage.snapshots.save(state(1))
    storage.status.put("w", {"x": 1})
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.name.endswith(".lock"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.parametrize("damage", ["header", "page"])
def test_a_damaged_log_is_reported_not_crashed_on(tmp_path, damage):
    path = tmp_path / "fb.sqlite"
    log = SQLiteFeedbackLog(path)
    for i in range(200):
        append(log, torch.randn(4, 64), [1, 2, 3, 4])
    log.close()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"fb.sqlite{suffix}").unlink(missing_ok=True)
    blob = bytearray(path.read_bytes())
    if damage == "header":
        blob[:16] = b"not a database!!"
    else:
        blob[4096 * 3:4096 * 3 + 512] = os.urandom(512)
    path.write_bytes(bytes(blob))
    with pytest.raises(StorageUnavailable, match="fb.sqlite"):
        broken = SQLiteFeedbackLog(path)
        list(broken.entries())
        broken.check()


def test_disk_full_is_507_naming_the_path_and_loses_nothing_written(tmp_path):
    """SQLite's page limit stands in for a full disk: the append that does not fit fails alone."""
    log = SQLiteFeedbackLog(tmp_path / "fb.sqlite")
    append(log, torch.randn(4, 64), [1, 2, 3, 4])
    log._conn.execute("PRAGMA max_page_count = 40")
    with pytest.raises(StorageFull) as caught:
        for _ in range(200):
            append(log, torch.randn(8, 64), list(range(8)))
    assert caught.value.code == 507 and "fb.sqlite" in caught.value.message and "no space" in caught.value.message
    written = sum(len(e.seq) for e in log.entries())
    assert written > 4 and (written - 4) % 8 == 0, "whole requests only: the failed one left no row"
    log._conn.execute("PRAGMA max_page_count = 1000000")
    append(log, torch.randn(1, 64), [5])  # space again: it goes on
    assert sum(len(e.seq) for e in log.entries()) == written + 1


# ---------------------------------------------------------------------- prediction record
def test_what_was_served_is_worked_out_once_per_flush_for_every_request_buffered(tmp_path):
    """The serving path buffers each request's outputs with how to read them (Deferred); the flush
    reads every buffered request's together, in one call, and records what each was served."""
    from selfheal_core.storage import Deferred
    from selfheal_core.task import Task

    task, calls = Task.from_outputs("classification", torch.zeros(1, 4)), []

    def served(outputs):
        calls.append(len(outputs))
        return task.served(outputs)

    rec = SQLitePredictionRecord(tmp_path / "p.sqlite", capacity=100)
    x, outputs = torch.randn(7, 3), torch.randn(7, 4)
    ids = [pid for i, n in ((0, 1), (1, 2), (3, 1), (4, 3))
           for pid in rec.add(x[i:i + n], Deferred(served, outputs[i:i + n]))]
    # another input shape, its served labels given as they are
    ids += rec.add(torch.randn(2, 5), torch.tensor([1, 2]), torch.tensor([0.25, 0.75]))
    assert rec.flush() == 9 and calls == [7]
    got = rec.get(ids)
    conf, labels = torch.softmax(outputs, 1).max(1)
    for i, pid in enumerate(ids[:7]):
        assert torch.equal(got[pid].x, x[i]) and int(got[pid].served) == int(labels[i])
        assert got[pid].confidence == pytest.approx(float(conf[i]))
    assert [int(got[p].served) for p in ids[7:]] == [1, 2] and got[ids[8]].confidence == 0.75


def test_prediction_record_is_bounded_in_bytes_and_durable(tmp_path):
    row = 2 * 3 * 4 + 4 + ROW_OVERHEAD  # input, served label, the row's own cost
    rec = SQLitePredictionRecord(tmp_path / "p.sqlite", capacity=100, max_bytes=300 * row)
    x = torch.randn(600, 2, 3)
    ids = rec.add(x, torch.arange(600) % 10, torch.full((600,), 0.5))
    assert len(rec) == 300 and rec.pruned == 300  # the budget holds 300 rows; pruned every 256 inserts
    assert rec.get(ids[:1]) == {}
    assert rec.stats()["bytes"] <= rec.max_bytes
    reopened = SQLitePredictionRecord(tmp_path / "p.sqlite", capacity=100)
    got = reopened.get([ids[-1]])[ids[-1]]
    assert torch.equal(got.x, x[-1]) and int(got.served) == 599 % 10 and got.confidence == 0.5


def test_a_prediction_a_week_old_resolves_after_memory_turned_over_and_a_restart(tmp_path):
    week = 7 * 86400
    rec = SQLitePredictionRecord(tmp_path / "p.sqlite", capacity=64)  # default retention: 30 days
    old = rec.add(torch.randn(10, 3), torch.arange(10), torch.full((10,), 0.9), now=time.time() - week)
    ancient = rec.add(torch.randn(5, 3), torch.arange(5), None, now=time.time() - 31 * 86400)
    for _ in range(20):  # 1,280 newer predictions: the in-memory buffer turned over many times
        rec.add(torch.randn(64, 3), torch.zeros(64), None)
    rec.flush()
    rec.prune()
    assert rec.pruned == 5  # past the retention period (pruned as it writes, and on demand)
    rec.close()
    reader = SQLitePredictionRecord(tmp_path / "p.sqlite", capacity=64)
    found, unknown, pending = reader.lookup(old + ancient, wait_s=1)
    assert set(found) == set(old) and set(unknown) == set(ancient) and not pending
    assert abs(found[old[0]].time - (time.time() - week)) < 60
    assert reader.stats()["reaches_back_s"] >= week - 60


def test_prediction_record_settings_are_checked(tmp_path):
    for bad in ({"retention_s": 0}, {"retention_s": float("nan")}, {"max_bytes": 0}):
        with pytest.raises(ValueError):
            SQLitePredictionRecord(tmp_path / "p.sqlite", **bad)


def test_lookup_waits_for_ids_on_their_way_but_not_for_unknown_ones(tmp_path):
    writer = SQLitePredictionRecord(tmp_path / "p.sqlite")
    writer.register()
    reader = SQLitePredictionRecord(tmp_path / "p.sqlite")
    ids = writer.add(torch.randn(2, 3), torch.tensor([1, 2]), torch.tensor([0.9, 0.8]))
    threading.Timer(0.3, writer.flush).start()  # the worker's background flush, a moment later
    start = time.monotonic()
    found, unknown, pending = reader.lookup(ids, wait_s=10)
    assert set(found) == set(ids) and not unknown and not pending and time.monotonic() - start < 5
    start = time.monotonic()
    found, unknown, pending = reader.lookup(["nope", "0" * 32], wait_s=10)
    assert unknown == ["nope", "0" * 32] and time.monotonic() - start < 5, "never handed out: no wait"
    start = time.monotonic()
    forged = ids[0][:20] + "f" * 12  # a real writer's prefix, a counter it could never hold unwritten
    found, unknown, pending = reader.lookup([forged], wait_s=10)
    assert unknown == [forged] and time.monotonic() - start < 5, "a forged counter is not waited for"
    start = time.monotonic()
    nxt = ids[0][:20] + f"{int(ids[-1][20:], 16) + 1:012x}"
    found, unknown, pending = reader.lookup([nxt], wait_s=0.5)
    assert pending == [nxt] and not unknown and time.monotonic() - start >= 0.5, \
        "a registered writer's next id is waited for, then reported as not yet written (not as unknown)"


def test_regression_predictions_are_recorded_as_values(tmp_path):
    rec = SQLitePredictionRecord(tmp_path / "p.sqlite")
    [pid] = rec.add(torch.randn(1, 4), torch.tensor([[1.5, 2.5]]), None)
    _, served, conf, _ = rec.get([pid])[pid]
    assert served.tolist() == [1.5, 2.5] and conf is None


# ---------------------------------------------------------------------- snapshots
def test_versions_increase_and_round_trip(tmp_path):
    store = FileSnapshotStore(tmp_path, keep=10)
    assert store.load_latest() is None
    assert [store.save(state(i), {"feedback": i}) for i in range(3)] == [1, 2, 3]
    loaded, meta = store.load_latest()
    assert torch.equal(loaded["w"], torch.full((3,), 2.0)) and meta["version"] == 3
    assert meta["parent"] == 2 and meta["feedback"] == 2


def test_a_published_record_of_many_small_tensors_costs_little_more_than_their_bytes(tmp_path):
    """Workers read every version: one of 42 norm and last-layer tensors (a ResNet-18's partial
    update) is within 1.1x their bytes, where torch.save's file per tensor made it 1.2x; the
    tensors come back equal, in their dtypes."""
    g = torch.Generator().manual_seed(0)
    weights = {f"layer{i // 8}.{i % 2}.bn{i % 4}.{'weight' if i % 2 else 'bias'}": torch.randn(256, generator=g)
               for i in range(40)}
    weights.update({"fc.weight": torch.randn(10, 512, generator=g), "fc.bias": torch.randn(10, generator=g)})
    state = {"format": 5, "weights": weights, "rebase": {"predicted": torch.arange(128, dtype=torch.int16)}}
    store = FileSnapshotStore(tmp_path)
    v = store.save(state, {"feedback_seq": 3})
    raw = sum(t.numel() * t.element_size() for t in weights.values())
    assert store.path(v).stat().st_size <= 1.1 * raw
    back, meta = store.load(v)
    assert meta["feedback_seq"] == 3 and back["rebase"]["predicted"].dtype == torch.int16
    assert back["weights"].keys() == weights.keys() and all(torch.equal(back["weights"][k], w) for k, w in weights.items())


def test_keeps_newest_k(tmp_path):
    store = FileSnapshotStore(tmp_path, keep=2)
    for i in range(5):
        store.save(state(i))
    assert store.versions() == [4, 5]


def test_the_learners_record_is_apart_from_what_workers_read_and_pruned_with_it(tmp_path):
    """Issue 28: a worker reads the published record only; the learner resumes from the newest
    version whose private record is whole (one killed between the two links has none)."""
    store = FileSnapshotStore(tmp_path, keep=2)
    big = {"replay": torch.zeros(100_000)}  # what only the learner needs: 400 kB
    for i in range(1, 4):
        store.save(state(i), {"feedback": i}, private={**big, "n": i})
    assert store.versions() == [2, 3] and sorted(p.name for p in tmp_path.glob("learner-*")) == \
        ["learner-00000002.pt", "learner-00000003.pt"]
    assert store.path(3).stat().st_size < 2_000, "a worker's read carries no learner state"
    store.save(state(4), {"feedback": 4})  # a version without its private record
    loaded, meta, private = store.load_resumable()
    assert meta["version"] == 3 and private["n"] == 3 and torch.equal(loaded["w"], torch.full((3,), 3.0))
    store.private_path(3).write_bytes(b"damaged")
    assert store.load_resumable() is None  # version 2 was pruned with its record: nothing whole is left
    assert store.load_latest()[1]["version"] == 4


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage):
    store = FileSnapshotStore(tmp_path)
    store.save(state(1))
    store.save(state(2))
    path = store.path(2)
    blob = path.read_bytes()
    path.write_bytes({"flip": blob[:-5] + b"XXXXX", "truncate": blob[: len(blob) // 2], "empty": b""}[damage])
    loaded, meta = store.load_latest()
    assert meta["version"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    with pytest.raises(ValueError, match="checksum"):
        store.load(2)


def test_stale_temp_files_are_swept_and_keep_is_checked(tmp_path):
    store = FileSnapshotStore(tmp_path)
    stale = tmp_path / ".tmp-snapshot-dead"
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    fresh = tmp_path / ".tmp-snapshot-writing"
    fresh.write_bytes(b"x")
    store.save(state(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-snapshot-writing", "snapshot-00000001.pt"]
    with pytest.raises(ValueError):
        FileSnapshotStore(tmp_path, keep=0)


def test_concurrent_writers_get_distinct_versions(tmp_path):
    stores = [FileSnapshotStore(tmp_path, keep=100) for _ in range(4)]
    got: list[int] = []
    lock = threading.Lock()

    def write(s):
        for i in range(5):
            v = s.save(state(i))
            with lock:
                got.append(v)

    threads = [threading.Thread(target=write, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 21))
    assert all(stores[0].load(v) for v in got)


# ---------------------------------------------------------------------- lease and status
def test_lease_is_exclusive_and_released(tmp_path):
    a, b = FileLease(tmp_path, "learner"), FileLease(tmp_path, "learner")
    assert a.try_acquire() and a.held and not b.try_acquire() and not b.is_free()
    a.release()
    assert b.is_free() and b.try_acquire()


def test_status_records_round_trip_and_age_out(tmp_path):
    board = FileStatusBoard(tmp_path)
    board.put("worker-1", {"drift": {"detected": True}, "norm": [torch.ones(2)]})
    got = board.read()["worker-1"]
    assert got["drift"]["detected"] and torch.equal(got["norm"][0], torch.ones(2))
    assert board.read(max_age_s=-1) == {}
    with pytest.raises(ValueError, match="member"):
        board.put("../x", {})


@pytest.mark.parametrize("damage", ["deleted", "replaced", "truncated"])
def test_labels_acknowledged_after_the_log_file_is_damaged_are_on_disk(tmp_path, damage):
    """The connection kept writing to a log file deleted, replaced or truncated under it, and the
    labels acknowledged afterwards were gone after a restart (issue 26 J)."""
    path = tmp_path / "feedback.sqlite"
    log_ = SQLiteFeedbackLog(path)
    x = torch.randn(3, 2)
    log_.append(x, ["1", "2", "3"], [None] * 3, [None] * 3)
    if damage == "deleted":
        path.unlink()
    elif damage == "replaced":
        other = SQLiteFeedbackLog(tmp_path / "other.sqlite")
        other.close()
        os.replace(tmp_path / "other.sqlite", path)
    else:
        os.truncate(path, 0)
    seqs = log_.append(torch.randn(2, 2), ["4", "5"], [None] * 2, [None] * 2)
    assert log_.reopened == 1 and len(seqs) == 2
    log_.close()
    reopened = SQLiteFeedbackLog(path)  # a restart
    targets = [t for rows in reopened.entries() for t in rows.target]
    assert targets[-2:] == ["4", "5"], "what was acknowledged after the damage is in the file"
    reopened.close()


def test_a_record_that_cannot_write_drops_and_counts_within_its_byte_budget(tmp_path, monkeypatch):
    """Issue 28: memory on the serving path is bounded in bytes. While the store fails, a worker's
    unwritten predictions stay within `buffer_bytes` (a 3x224x224 float input is 600 kB: 10,000
    of them were 6 GB), the oldest dropped and counted; once it writes again, nothing more is lost."""
    rec = SQLitePredictionRecord(tmp_path / "p.sqlite", capacity=10_000, buffer_bytes=4 * 3 * 32 * 32 * 4)

    def fail(*_a):
        raise StorageFull("no space left (test)")

    monkeypatch.setattr(rec, "_write", fail)
    for _ in range(50):
        rec.add(torch.randn(2, 3, 32, 32), torch.zeros(2), None)
        assert rec._buffered_bytes < rec.buffer_bytes + 2 * 3 * 32 * 32 * 4
    assert rec.dropped >= 90 and rec.stats()["dropped_unwritten"] == rec.dropped
    monkeypatch.undo()
    ids = rec.add(torch.randn(2, 3, 32, 32), torch.zeros(2), None)
    rec.flush()
    assert set(rec.get(ids)) == set(ids) and rec._buffered_bytes == 0


def test_a_learner_record_is_written_from_its_buffer_without_copies(tmp_path):
    """Issue 28: a 224x224 learner's private record carries 64 MB of replayed images; written as
    (checksum line, a view of torch.save's buffer), not copied out and joined (three copies at
    every publish). The same bytes as one blob, and it loads."""
    from selfheal_core.storage.files import pack, packed

    record = {"learner": {"x": [torch.randn(3, 32, 32).half() for _ in range(4)], "n": 7}}
    head, body = packed(record)
    assert isinstance(body, memoryview) and pack(record)[len(head):] == bytes(body)
    store = FileSnapshotStore(tmp_path)
    version = store.save({"weights": {}}, {}, record)
    loaded = store.load_private(version)
    assert loaded["learner"]["n"] == 7
    assert all(torch.equal(a, b) for a, b in zip(loaded["learner"]["x"], record["learner"]["x"]))
