"""SnapshotStore: atomic, checksummed, versioned; corrupt files are skipped."""
from __future__ import annotations

import threading

import pytest
import torch

from selfheal_core.store import SnapshotStore


def state(v: float) -> dict:
    return {"w": torch.full((3,), v), "n": int(v)}


def test_versions_increase_and_round_trip(tmp_path):
    store = SnapshotStore(tmp_path, keep=10)
    assert store.load_latest() is None
    assert [store.save(state(i), {"feedback": i}) for i in range(3)] == [1, 2, 3]
    loaded, meta = store.load_latest()
    assert torch.equal(loaded["w"], torch.full((3,), 2.0)) and meta["version"] == 3
    assert meta["parent"] == 2 and meta["feedback"] == 2


def test_keeps_newest_k(tmp_path):
    store = SnapshotStore(tmp_path, keep=2)
    for i in range(5):
        store.save(state(i))
    assert store.versions() == [4, 5]


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage):
    store = SnapshotStore(tmp_path)
    store.save(state(1))
    store.save(state(2))
    path = store.path(2)
    blob = path.read_bytes()
    path.write_bytes({"flip": blob[:-5] + b"XXXXX", "truncate": blob[: len(blob) // 2], "empty": b""}[damage])
    loaded, meta = store.load_latest()
    assert meta["version"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    with pytest.raises(ValueError, match="checksum"):
        store.load(2)


def test_no_temp_files_left_and_bad_keep(tmp_path):
    store = SnapshotStore(tmp_path)
    store.save(state(1))
    assert [p.name for p in tmp_path.iterdir()] == ["snapshot-00000001.pt"]
    with pytest.raises(ValueError):
        SnapshotStore(tmp_path, keep=0)


def test_concurrent_writers_get_distinct_versions(tmp_path):
    stores = [SnapshotStore(tmp_path, keep=100) for _ in range(4)]
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
