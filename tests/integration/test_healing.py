"""Healing over HTTP: drift noticed, accuracy recovered with feedback, snapshot survives restart."""
from __future__ import annotations

import copy

import torch

from selfheal_bench.data import corrupt, load_digits_split, resample
from selfheal_core import SelfHealer, SnapshotStore


def stream(name, severity, n, seed):
    _, _, x_te, y_te = load_digits_split(seed=0)
    x, y = resample(x_te, y_te, n, seed=seed)
    return (corrupt(x, name, severity, seed=seed) if name else x), y


def replay(server, x, y, batch=16, feedback_every=0):
    """Predict in requests of `batch`; optional feedback by id for every k-th prediction."""
    labels = []
    for i in range(0, len(y), batch):
        r = server.predict({"instances": x[i:i + batch].tolist()})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        labels += [p["label"] for p in preds]
        if feedback_every:
            fb = [{"id": p["id"], "label": int(y[i + j])} for j, p in enumerate(preds)
                  if (i + j) % feedback_every == 0]
            if fb:
                assert server.feedback({"feedback": fb}).status_code == 200
    return torch.tensor(labels)


def test_drift_detected_on_corrupted_not_on_clean(start_server):
    with start_server() as server:
        replay(server, *stream(None, 0, 600, seed=1))
        assert server.status()["drift"]["detected"] is False
        replay(server, *stream("contrast", 5, 300, seed=2))
        status = server.status()
        assert status["drift"]["detected"] is True and "confidence" in status["drift"]["firing"]


def test_feedback_improves_accuracy_on_corrupted_stream(start_server, demo_model):
    x, y = stream("rotate", 4, 2400, seed=3)
    with torch.no_grad():
        static = (demo_model(x).argmax(1) == y).float()
    with start_server() as server:
        served = (replay(server, x, y, feedback_every=5) == y).float()
        status = server.status()
    tail = slice(1600, None)
    assert served[tail].mean() > static[tail].mean() + 0.05, (served[tail].mean(), static[tail].mean())
    assert status["counters"]["feedback"] == len(range(0, 2400, 5)) and status["guard"]["accepted"] > 0


def test_restart_resumes_from_snapshot(start_server, tmp_path, reference, demo_model):
    """The restarted server serves the newest snapshot: same version, exactly its predictions."""
    snapshots = tmp_path / "snapshots"
    x, y = stream("rotate", 4, 400, seed=4)
    probe = reference[0][:32]
    with start_server(snapshots) as server:
        for i in range(0, 400, 40):
            assert server.feedback({"instances": x[i:i + 40].tolist(), "labels": y[i:i + 40].tolist()}).ok
        server.predict({"instances": probe.tolist()})
        version = server.status()["version"]
    assert version >= 1 and SnapshotStore(snapshots / "digits").latest_version() == version
    with start_server(snapshots) as server:
        assert server.status()["version"] == version
        after = server.predict({"instances": probe.tolist()}).json()
    assert after["model_version"] == version
    served = torch.tensor([p["probabilities"] for p in after["predictions"]])
    # The snapshot file itself, loaded outside TorchServe, predicts the same.
    local = SelfHealer(copy.deepcopy(demo_model), reference[0], reference_labels=reference[1],
                       store=SnapshotStore(snapshots / "digits"))
    assert local.resume(version) == version
    expected = torch.softmax(local.predict(probe), 1)
    assert torch.allclose(served, expected, atol=2e-6)
    with torch.no_grad():
        source = torch.softmax(demo_model(probe), 1)
    assert not torch.allclose(served, source, atol=1e-3), "feedback should have changed the weights"
