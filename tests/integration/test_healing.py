"""Healing over HTTP: drift noticed, accuracy recovered with feedback, a restart resumes the version."""
from __future__ import annotations

import copy

import torch

from selfheal_bench.data import corrupt, load_digits_split, resample
from selfheal_core import FileSnapshotStore, SelfHealer
from selfheal_serving.header import parse_header
from tests.conftest import wait_until


def stream(name, severity, n, seed):
    _, _, x_te, y_te = load_digits_split(seed=0)
    x, y = resample(x_te, y_te, n, seed=seed)
    return (corrupt(x, name, severity, seed=seed) if name else x), y


def replay(server, x, y, batch=16, feedback_every=0, paced=False):
    """Predict in requests of `batch`; feedback by id for every k-th prediction, one request late.
    `paced`: each request's labels only once the learner absorbed the ones before (see below)."""
    labels, pending, sent = [], [], 0
    for i in range(0, len(y), batch):
        r = server.predict({"instances": x[i:i + batch].tolist()})
        assert r.status_code == 200, r.text
        labels += [p["label"] for p in r.json()["predictions"]]
        if pending:
            if paced:
                wait_until(server.feedback_status, lambda st: st.get("absorbed", 0) >= sent, 120,
                           f"the learner absorbs the {sent} labels sent so far")
            assert server.feedback({"feedback": pending}).status_code == 200
            sent += len(pending)
        pending = [{"id": pid, "label": int(y[i + j])} for j, pid in enumerate(server.ids(r))
                   if feedback_every and (i + j) % feedback_every == 0]
    if pending:
        assert server.feedback({"feedback": pending}).status_code == 200
    return torch.tensor(labels)


def test_drift_detected_on_corrupted_not_on_clean(start_server):
    with start_server() as server:
        replay(server, *stream(None, 0, 600, seed=1))
        assert server.status()["drift"]["detected"] is False
        replay(server, *stream("contrast", 5, 300, seed=2))
        status = server.status()
        assert status["drift"]["detected"] is True and "confidence" in status["drift"]["firing"]
        r = server.predict({"instances": stream("contrast", 5, 2, seed=3)[0].tolist()})
        assert server.selfheal(r)["drift"] is True and "confidence" in server.selfheal(r)["detectors"]


def test_feedback_improves_accuracy_on_corrupted_stream(start_server, demo_model):
    """Labels for every 5th prediction of a rotated stream, by id; once the learner has absorbed and
    published them (waited for, not assumed: the learner runs at nice 19 beside the worker), the
    rest of the stream is served better than by the static model.

    The labels are paced at the rate the learner absorbs them: beside two CPU hogs the nice-19
    learner fell behind, folded the 260 labels into a few updates of up to `max_labels_per_update`
    (delay bounded, fewer steps per label) and served 0.391 against the static 0.390. What labels
    teach is tested here; how a learner that falls behind trades steps for delay is that setting's."""
    x, y = stream("rotate", 4, 2000, seed=3)
    with torch.no_grad():
        static = (demo_model(x).argmax(1) == y).float()
    with start_server() as server:
        replay(server, x[:1300], y[:1300], feedback_every=5, paced=True)
        status = server.settled(timeout=120)
        server.serving_version(x[:4].tolist(), at_least=status["version"])
        served = (replay(server, x[1300:], y[1300:]) == y[1300:]).float()
    assert served.mean() > static[1300:].mean() + 0.05, (served.mean(), static[1300:].mean(), status["counters"])
    assert status["counters"]["feedback"] == 260 and status["guard"]["accepted"] > 0


def test_restart_resumes_from_snapshot(start_server, tmp_path, reference, demo_model):
    """The restarted server serves the newest version: same number, exactly its predictions."""
    snapshots = tmp_path / "snapshots"
    x, y = stream("rotate", 4, 400, seed=4)
    probe = reference[0][:32]
    with start_server(snapshots) as server:
        for i in range(0, 400, 40):
            assert server.feedback({"instances": x[i:i + 40].tolist(), "labels": y[i:i + 40].tolist()}).ok
        version = server.settled()["version"]
        assert server.serving_version(probe.tolist(), at_least=version) == version
    assert version >= 1 and FileSnapshotStore(snapshots / "digits").latest_version() == version
    with start_server(snapshots) as server:
        after = server.predict({"instances": probe.tolist()})
        assert server.settled()["version"] == version, "nothing new to publish after the restart"
    assert parse_header(after.headers["X-Selfheal"])["version"] == version
    served = torch.tensor([p["probabilities"] for p in after.json()["predictions"]])
    # The snapshot file itself, loaded outside TorchServe, predicts the same.
    local = SelfHealer(copy.deepcopy(demo_model), reference[0], reference_labels=reference[1],
                       store=FileSnapshotStore(snapshots / "digits"))
    assert local.resume(version) == version
    expected = torch.softmax(local.predict(probe), 1)
    assert torch.allclose(served, expected, atol=2e-6)
    with torch.no_grad():
        source = torch.softmax(demo_model(probe), 1)
    assert not torch.allclose(served, source, atol=1e-3), "feedback should have changed the weights"
