"""Nothing acknowledged is lost: SIGKILL the worker mid-stream; the restarted one serves the newest version."""
from __future__ import annotations

import os
import signal
import sqlite3

from selfheal_bench.data import corrupt, load_digits_split, resample
from selfheal_core.storage import open_storage
from tests.conftest import wait_until


def test_sigkill_worker_loses_no_label_and_resumes_version(start_server):
    _, _, x_te, y_te = load_digits_split(seed=0)
    x, y = resample(x_te, y_te, 160, seed=5)
    x = corrupt(x, "rotate", 4, seed=5)
    with start_server() as server:
        for i in range(0, 120, 40):
            r = server.feedback({"instances": x[i:i + 40].tolist(), "labels": y[i:i + 40].tolist()})
            assert r.status_code == 200, r.text
        before = server.settled()
        version = server.serving_version(x[120:124].tolist(), at_least=before["version"])
        r = server.predict({"instances": x[120:124].tolist()})
        served_ids = server.ids(r)
        assert before["counters"]["feedback"] == 120 and before["log"]["entries"] == 120
        # ids are written by the worker's background flush within a fraction of a second (a SIGKILL
        # inside that window loses them: feedback for those waits, then answers 404)
        record = open_storage("digits", server.snapshots / "digits").predictions
        wait_until(lambda: record.get(served_ids), lambda got: len(got) == 4, 30, "the worker records the ids")

        old = server.ts.worker_pids()
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        wait_until(server.ts.worker_pids, lambda pids: pids and not set(pids) & set(old), 120, "a new worker")
        server.ts.wait_ready(120)
        # The new worker serves the newest published version at once; nothing was lost.
        r = server.predict({"instances": x[120:124].tolist()})
        assert server.version(r) == version
        after = server.settled()
        assert after["log"]["entries"] == 120 and after["absorbed"] == 120 and after["version"] == version
        # Prediction ids survive the worker: feedback for one served before the kill is taken once.
        fb = {"feedback": [{"id": served_ids[0], "label": int(y[120])}]}
        assert server.feedback(fb).status_code == 200
        again = server.feedback(fb)
        assert again.status_code == 409 and "already" in again.json()["message"]
        assert server.settled()["log"]["entries"] == 121
        lineage = [open_storage("digits", server.snapshots / "digits").snapshots.load(v)[1]
                   for v in open_storage("digits", server.snapshots / "digits").snapshots.versions()]
        assert all(m["based_on"] == m["parent"] for m in lineage)
    db = sqlite3.connect(server.snapshots / "digits" / "feedback.sqlite")
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT seq) FROM feedback").fetchone() == (121, 121)


def test_a_snapshot_directory_of_another_architecture_is_skipped_not_crashed_on(start_server, tmp_path, reference):
    """A model served over an old snapshot directory of another architecture crashed its worker at
    start, in a loop (issue 26 K). Now the worker skips that version with the reason (faults) and
    serves; the learner starts from the source model and publishes above it."""
    import torch

    from selfheal_core.learner import SNAPSHOT_FORMAT
    from selfheal_core.storage import FileSnapshotStore

    snapshots = tmp_path / "snapshots"
    other = {"format": SNAPSHOT_FORMAT, "weights": {"features.0.weight": torch.zeros(5, 3, 7, 7)}}
    FileSnapshotStore(snapshots / "digits").save(other, {"feedback_seq": 0},
                                                 private={"format": SNAPSHOT_FORMAT, "learner": {}})
    x, y = reference
    with start_server(snapshots=snapshots) as server:
        r = server.predict({"instances": x[:4].tolist()})
        # version 0, or 2 once the learner republished the source model above the foreign version
        assert r.status_code == 200 and server.version(r) != 1, r.text
        status = wait_until(server.status, lambda st: (st.get("faults") or {}).get("install", {}).get("count"), 60,
                            "the worker reports the version it skipped")
        assert "version 1 skipped" in status["faults"]["install"]["last_error"]
        fb = server.feedback({"instances": x[:40].tolist(), "labels": y[:40].tolist()})
        assert fb.status_code == 200, fb.text
        learner = server.settled()
        assert any("does not fit this model" in w for w in learner["warnings"])
        assert server.serving_version(x[:4].tolist(), at_least=2) >= 2, "a version above the foreign one is served"
        faults = server.status()["faults"]
        assert faults["install"].get("error") is None, faults  # (TorchServe drops null fields)
