"""A writer killed while publishing never leaves a broken newest snapshot behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from selfheal_core import SnapshotStore

WRITER = """
import sys, torch
from selfheal_core import SnapshotStore
store = SnapshotStore(sys.argv[1], keep=50)
big = {"w": torch.randn(2_000_000)}  # ~8 MB: saving takes long enough to be killed midway
while True:
    store.save(big, {"writer": "child"})
"""


def test_sigkill_during_publish_leaves_previous_snapshot_valid(tmp_path):
    store = SnapshotStore(tmp_path, keep=50)
    store.save({"w": torch.zeros(3)}, {"writer": "parent"})
    for delay in (0.3, 0.45, 0.6, 0.75):
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        state, meta = store.load_latest()
        assert meta["version"] == store.latest_version(), "the newest name always holds a whole snapshot"
        for v in store.versions():
            store.load(v)  # every named version is complete and checksummed
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-snapshot-")]
    assert len(leftovers) <= 4, leftovers  # temp files of killed writers: unnamed, never loaded
