"""Live accuracy without labels: ATC against the truth, labels moving it, state across a snapshot."""
from __future__ import annotations

import copy

import torch

from selfheal_bench.data import corrupt, resample
from selfheal_core import FileSnapshotStore, HealConfig, SelfHealer
from selfheal_core.estimate import AccuracyEstimator

MONITOR_ONLY = HealConfig.from_dict({"adapt": False, "snapshot_interval_s": 0.0})


def serve(h, x):
    out = torch.cat([h.predict(x[i:i + 50]) for i in range(0, len(x), 50)])
    h.drain()
    return out.argmax(1)


def test_estimate_follows_accuracy_on_clean_and_mildly_shifted_digits(demo_model, reference, digits):
    _, _, x_te, y_te = digits
    for corruption, severity, tolerance in ((None, 0, 0.03), ("contrast", 3, 0.07), ("blur", 3, 0.07)):
        x, y = resample(x_te, y_te, 500, seed=3)
        if corruption:
            x = corrupt(x, corruption, severity, seed=3)
        h = SelfHealer(copy.deepcopy(demo_model), reference[0], MONITOR_ONLY, reference_labels=reference[1])
        true = float((serve(h, x) == y).float().mean())
        est = h.status()["accuracy"]["estimate"]
        assert abs(est - true) <= tolerance, (corruption, est, true)
        h.close()


def test_labels_move_the_estimate_towards_what_they_show(demo_model, reference):
    h = SelfHealer(copy.deepcopy(demo_model), reference[0], MONITOR_ONLY, reference_labels=reference[1])
    serve(h, reference[0])
    est = h.serving.estimator
    base = est.estimate
    assert est.corrected(None) == base
    lower = est.corrected({"n": 200, "observed": base - 0.3, "estimated": base})
    assert base - 0.3 < lower < base - 0.2, "200 labels saying 30 points lower move it most of the way"
    assert est.corrected({"n": 2, "observed": 0.0, "estimated": base}) > base - 0.2, "two labels move it little"


def test_estimator_state_round_trips_through_a_snapshot(demo_model, reference, digits, tmp_path):
    _, _, x_te, y_te = digits
    x, _ = resample(x_te, y_te, 300, seed=4)
    x = corrupt(x, "contrast", 4, seed=4)
    store = FileSnapshotStore(tmp_path / "snaps")
    h = SelfHealer(copy.deepcopy(demo_model), reference[0], MONITOR_ONLY, reference_labels=reference[1], store=store)
    serve(h, x)
    version = h.save_snapshot()
    other = SelfHealer(copy.deepcopy(demo_model), reference[0], MONITOR_ONLY, reference_labels=reference[1],
                       store=store)
    assert other.status()["accuracy"]["estimate"] is None, "nothing served yet"
    assert other.resume() == version
    a, b = h.status()["accuracy"], other.status()["accuracy"]
    assert a["estimate"] == b["estimate"] and a["threshold"] == b["threshold"] and a["window"] == b["window"] == 300
    h.close()
    other.close()


def test_class_bound_is_one_minus_the_predicted_class_shift():
    est = AccuracyEstimator(window=100)
    ref_classes = torch.arange(4).repeat(50)  # a quarter each
    est.calibrate(torch.full((200,), 0.9), torch.ones(200, dtype=torch.bool), classes=ref_classes)
    est.observe(torch.full((40,), 0.9), torch.zeros(40, dtype=torch.long))
    assert est.class_bound() is None, "half a window first"
    est = AccuracyEstimator(window=100).calibrate(torch.full((200,), 0.9), torch.ones(200, dtype=torch.bool),
                                                  classes=ref_classes)
    est.observe(torch.full((100,), 0.9), torch.cat([torch.zeros(70), torch.arange(1, 4).repeat(10)]).long())
    assert abs(est.class_bound() - (1 - 0.5 * (0.45 + 3 * 0.15))) < 1e-9  # 70% class 0 against 25%
    est.observe(torch.full((100,), 0.9), torch.full((100,), 6))  # a class the reference never predicted
    assert est.class_bound() == 0.0


def test_rotated_digits_a_sure_model_gets_wrong_are_not_trusted(demo_model, reference, digits):
    """Rotated or translated digits: ATC said 0.79-0.80 at 6-27% accuracy, because the model is sure
    of its wrong answers; its predicted classes moved far more than that accuracy allows, so the
    estimate says it cannot be trusted. Clean digits (and a shift it gets right) stay trusted."""
    from selfheal_core import ServingModel

    x_ref, y_ref = reference
    _, _, x_te, y_te = digits
    x, _ = resample(x_te, y_te, 1000, seed=3)
    monitor_only = HealConfig.from_dict({"adapt": False})
    for stream, trusted in ((x, True), (corrupt(x, "rotate", 5, seed=3), False)):
        serving = ServingModel(demo_model, x_ref, monitor_only, reference_targets=y_ref)
        for i in range(0, len(stream), 16):
            serving.predict(stream[i:i + 16])
            serving.drain()
        accuracy = serving.status()["accuracy"]
        assert accuracy["trusted"] is trusted, accuracy
        if not trusted:
            assert "predicted classes moved" in accuracy["untrusted_reason"]
