"""A writer killed while publishing never leaves a broken newest snapshot behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from selfheal_core.storage import FileSnapshotStore

WRITER = """
import sys, torch
from selfheal_core.storage import FileSnapshotStore
store = FileSnapshotStore(sys.argv[1], keep=50)
big = {"w": torch.randn(4_000_000)}  # ~16 MB: a save takes long enough to be killed midway
store.save(big, {"writer": "child"})
print("saving", flush=True)  # the handshake: imports done, one version written, the loop starts now
while True:
    store.save(big, {"writer": "child"})
"""


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.1, 0.2])
def test_sigkill_during_publish_leaves_the_newest_snapshot_whole(tmp_path, delay):
    store = FileSnapshotStore(tmp_path, keep=50)
    store.save({"w": 0}, {"writer": "parent"})
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()  # blocks until the child is in its save loop (or dies)
        assert line.strip() == "saving", f"the writer did not start: {line!r}, exit {child.poll()}"
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(30)
    temp = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-snapshot-")]
    assert store.latest_version() >= 2, "the child published before it was killed"
    state, meta = store.load_latest()
    assert meta["version"] == store.latest_version(), "the newest name always holds a whole snapshot"
    for v in store.versions():
        store.load(v)  # every named version is complete and checksummed
    assert len(temp) <= 1, temp  # at most the one save the kill interrupted, never named
