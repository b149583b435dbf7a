"""The learner process for real (no TorchServe): announcement, secret, intake over HTTP, learning, publishing."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import requests

from selfheal_bench.examples import data
from selfheal_core.storage import open_storage
from tests.conftest import wait_until
from tests.torchserve.conftest import digits_args, np_list, rul_args


def start_learner(model_dir, workdir, name, *extra):
    cmd = [sys.executable, "-m", "selfheal_torchserve.learner_service", "--model-dir", str(model_dir), "--handler",
           "selfheal_handler:SelfHealHandler", "--model-name", name, "--workdir", str(workdir), "--nice", "0", *extra]
    log = open(workdir / "learner.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    path = workdir / "selfheal" / f"{name}.json"

    def announced():
        if proc.poll() is not None:
            raise AssertionError(f"learner exited {proc.returncode}: {(workdir / 'learner.log').read_text()[-3000:]}")
        return path.exists() and json.loads(path.read_text())["pid"] == proc.pid

    wait_until(announced, bool, 120, "the learner announces its port")
    return proc, json.loads(path.read_text())


def post(info, name, body, secret=None, route=""):
    return requests.post(f"http://127.0.0.1:{info['port']}/feedback/{name}{route}", json=body, timeout=30,
                         headers={"X-Selfheal-Secret": info["secret"] if secret is None else secret})


def test_learner_takes_feedback_learns_and_publishes(archives, trained, tmp_path, monkeypatch, reference, digits):
    snapshots = tmp_path / "snapshots"
    monkeypatch.setenv("SELFHEAL_SNAPSHOT_DIR", str(snapshots))
    model_dir = archives("digits", digits_args(trained), {"learner": "auto"})
    proc, info = start_learner(model_dir, tmp_path, "digits")
    try:
        path = tmp_path / "selfheal" / "digits.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, "the secret is readable by this user only"
        body = {"instances": np_list(reference[0][:2]), "labels": reference[1][:2].tolist()}
        assert post(info, "digits", body, secret="wrong").status_code == 403
        assert post(info, "digits", body, secret="").status_code == 403
        r = post(info, "digits", {"instances": np_list(reference[0][:2]), "labels": [3, 99]})
        assert r.status_code == 422 and "out of range" in r.json()["message"]
        _, _, x_te, y_te = digits
        from selfheal_bench.data import corrupt, resample

        x, y = resample(x_te, y_te, 16, seed=4)
        x = corrupt(x, "rotate", 4, seed=4)
        r = post(info, "digits", {"instances": np_list(x), "labels": y.tolist()})
        assert r.status_code == 200 and r.json()["accepted"] == 16, r.text
        store = open_storage("digits", snapshots / "digits").snapshots
        wait_until(store.latest_version, lambda v: v >= 1, 60, "a published version")
        status = wait_until(lambda: requests.get(f"http://127.0.0.1:{info['port']}/feedback/digits", timeout=10,
                                                 headers={"X-Selfheal-Secret": info["secret"]}).json(),
                            lambda st: st.get("absorbed") == 16, 60, "the learner absorbed every label")
        assert status["active"] and status["log"]["entries"] == 16 and status["intake"]["accepted"] == 16
        assert status["label_delay"]["labels"] == 16 and status["label_delay"]["p99_s"] < 30
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not (tmp_path / "selfheal" / "digits.json").exists(), "a clean stop removes the announcement"


def test_regression_targets_and_a_second_learner_stands_by(archives, trained, tmp_path, monkeypatch):
    snapshots = tmp_path / "snapshots"
    monkeypatch.setenv("SELFHEAL_SNAPSHOT_DIR", str(snapshots))
    model_dir = archives("rul", rul_args(trained), {"learner": "auto"})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, info = start_learner(model_dir, tmp_path / "a", "rul")
    second, info_b = start_learner(model_dir, tmp_path / "b", "rul")
    try:
        rows = data.rul(16, seed=5, shift=True)
        r = post(info_b, "rul", {"instances": np_list(rows.x), "targets": rows.y[:, 0].tolist()})
        assert r.status_code == 200, r.text
        r = post(info_b, "rul", {"instances": np_list(rows.x[:1]), "labels": [3]})
        assert r.status_code == 400 and "labels are for a classification model" in r.json()["message"]
        board = open_storage("rul", snapshots / "rul").status
        learners = wait_until(lambda: [v for v in board.read().values() if v.get("role") == "learner"],
                              lambda ls: len(ls) == 2 and any(l.get("absorbed") == 16 for l in ls), 60,
                              "one learner absorbs what the other took in")
        assert sorted(l["active"] for l in learners) == [False, True], "one learner per model and directory"
    finally:
        for p in (first, second):
            p.send_signal(signal.SIGTERM)
            p.wait(30)


def test_learner_exits_when_torchserve_is_gone(archives, trained, tmp_path, monkeypatch):
    monkeypatch.setenv("SELFHEAL_SNAPSHOT_DIR", str(tmp_path / "snapshots"))
    model_dir = archives("digits", digits_args(trained), {"learner": "auto"})
    frontend = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    proc, _ = start_learner(model_dir, tmp_path, "digits", "--frontend-pid", str(frontend.pid))
    frontend.kill()
    frontend.wait()
    try:
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)


def stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def learner_status(info, name):
    return requests.get(f"http://127.0.0.1:{info['port']}/feedback/{name}", timeout=10,
                        headers={"X-Selfheal-Secret": info["secret"]}).json()


def test_a_lost_log_is_detected_and_rebased(archives, trained, tmp_path, monkeypatch, reference):
    """Snapshots remain, the feedback log is gone: said in the log and status, and new labels are learned."""
    snapshots = tmp_path / "snapshots"
    monkeypatch.setenv("SELFHEAL_SNAPSHOT_DIR", str(snapshots))
    model_dir = archives("digits", digits_args(trained), {"learner": "auto"})
    body = {"instances": np_list(reference[0][:16]), "labels": reference[1][:16].tolist()}
    proc, info = start_learner(model_dir, tmp_path, "digits")
    try:
        assert post(info, "digits", body).status_code == 200
        wait_until(lambda: learner_status(info, "digits"), lambda st: st.get("absorbed") == 16 and st["version"] >= 1,
                   60, "16 labels absorbed and published")
    finally:
        stop(proc)
    for path in (snapshots / "digits").glob("feedback.sqlite*"):
        path.unlink()
    proc, info = start_learner(model_dir, tmp_path, "digits")
    try:
        status = wait_until(lambda: learner_status(info, "digits"), lambda st: st.get("warnings"), 60,
                            "the learner reports the lost log")
        assert "lost or replaced" in status["warnings"][0] and "re-based" in status["warnings"][0]
        assert "lost or replaced" in (tmp_path / "learner.log").read_text()
        assert post(info, "digits", {"instances": body["instances"][:8], "labels": body["labels"][:8]}).ok
        wait_until(lambda: learner_status(info, "digits"), lambda st: st.get("absorbed") == 8, 60,
                   "labels logged after the loss are learned")
    finally:
        stop(proc)


def test_a_corrupt_log_refuses_feedback_with_its_cause(archives, trained, tmp_path, monkeypatch, reference):
    """A log that is not a database: feedback answers 503 "feedback log unavailable: ...", status names it."""
    snapshots = tmp_path / "snapshots"
    monkeypatch.setenv("SELFHEAL_SNAPSHOT_DIR", str(snapshots))
    (snapshots / "digits").mkdir(parents=True)
    (snapshots / "digits" / "feedback.sqlite").write_bytes(b"this is not a database" * 200)
    model_dir = archives("digits", digits_args(trained), {"learner": "auto"})
    proc, info = start_learner(model_dir, tmp_path, "digits")
    try:
        r = post(info, "digits", {"instances": np_list(reference[0][:2]), "labels": reference[1][:2].tolist()})
        assert r.status_code == 503 and r.json()["message"].startswith("feedback log unavailable: "), r.text
        assert r.text.isascii()
        status = wait_until(lambda: learner_status(info, "digits"), lambda st: st.get("log_error"), 60,
                            "status names the log's problem")
        assert "feedback.sqlite" in status["log_error"] or "database" in status["log_error"]
    finally:
        stop(proc)
