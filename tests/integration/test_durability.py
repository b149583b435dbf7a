"""Nothing learned is lost: SIGKILL the worker mid-stream; the restarted one resumes and replays the log."""
from __future__ import annotations

import os
import signal
import sqlite3
import time

from selfheal_bench.data import corrupt, load_digits_split, resample
from selfheal_core import SnapshotStore


def wait_for_new_worker(server, old: list[int], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = server.ts.worker_pids()
        if pids and not set(pids) & set(old):
            try:
                server.ts.wait_ready(5)
                return
            except TimeoutError:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"no new worker after SIGKILL:\n{server.ts.log_tail()}")


def test_sigkill_worker_loses_no_label_and_resumes_version(start_server, rare_snapshot_store):
    _, _, x_te, y_te = load_digits_split(seed=0)
    x, y = resample(x_te, y_te, 160, seed=5)
    x = corrupt(x, "rotate", 4, seed=5)
    with start_server(store=rare_snapshot_store) as server:
        accepted = 0
        for i in range(0, 120, 40):  # the first call is published (v1); the next two live only in the log
            r = server.feedback({"instances": x[i:i + 40].tolist(), "labels": y[i:i + 40].tolist()})
            assert r.status_code == 200, r.text
            accepted += r.json()["accepted"]
            deadline = time.monotonic() + 30
            while i == 0 and server.status()["version"] < 1 and time.monotonic() < deadline:
                time.sleep(0.2)
        served = server.predict({"instances": x[120:124].tolist()}).json()["predictions"]
        before = server.status()
        assert before["version"] == 1 and before["counters"]["feedback"] == accepted == 120
        assert before["feedback_log"]["entries"] == 120
        assert SnapshotStore(server.snapshots / "digits").load(1)[1]["feedback_seq"] == 40, "v1 holds 40 labels"

        old = server.ts.worker_pids()
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        wait_for_new_worker(server, old)

        after = server.status()
        # It resumes version 1 and replays the 80 later labels; publishing them is the next version.
        assert after["version"] >= 1
        lineage = [SnapshotStore(server.snapshots / "digits").load(v)[1] for v in range(2, after["version"] + 1)]
        assert all(meta["based_on"] == meta["version"] - 1 for meta in lineage), lineage
        assert after["counters"]["feedback"] == 120, "labels after the snapshot are replayed from the log"
        assert after["feedback_log"]["entries"] == 120 and after["feedback_log"]["absorbed"] == 120
        # Prediction ids survive the worker: feedback for one served before the kill is taken once.
        fb = {"feedback": [{"id": served[0]["id"], "label": int(y[120])}]}
        assert server.feedback(fb).status_code == 200
        again = server.feedback(fb)
        assert again.status_code == 409 and "already" in again.json()["message"]
        assert server.status()["feedback_log"]["entries"] == 121
    db = sqlite3.connect(server.snapshots / "digits" / "feedback.sqlite")
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT seq) FROM feedback").fetchone() == (121, 121)
