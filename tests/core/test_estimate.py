"""Live accuracy without labels: ATC against the truth, labels moving it, state across a snapshot."""
from __future__ import annotations

import copy

import pytest
import torch

from selfheal_bench.data import corrupt, resample
from selfheal_core import FileSnapshotStore, HealConfig, SelfHealer
from selfheal_core.estimate import (ATYPICAL_GATE, PRIOR_LABELS, AccuracyEstimator, LabelledAccuracy, interpolate,
                                    isotonic)

MONITOR_ONLY = HealConfig.from_dict({"adapt": False, "snapshot_interval_s": 0.0})


def serve(h, x):
    out = torch.cat([h.predict(x[i:i + 50]) for i in range(0, len(x), 50)])
    h.drain()
    return out.argmax(1)


def test_estimate_follows_accuracy_on_clean_and_mildly_shifted_digits(demo_model, reference, digits):
    _, _, x_te, y_te = digits
    # contrast-3: every input atypical to this small CNN, 95% right; ATC reads 5 points low and the
    # class mix (a little off the reference's) takes 3 more
    for corruption, severity, tolerance in ((None, 0, 0.03), ("contrast", 3, 0.08), ("blur", 3, 0.08)):
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
    # 70% class 0 against 25%, 10% each of the others: each difference shrunk by its sampling variance
    noise = [0.7 * 0.3 / 100 + 0.25 * 0.75 / 200] + 3 * [0.1 * 0.9 / 100 + 0.25 * 0.75 / 200]
    diffs = [0.45] + 3 * [0.15]
    expected = 1 - 0.5 * sum(max(d * d - v, 0.0) ** 0.5 for d, v in zip(diffs, noise))
    assert abs(est.class_bound() - expected) < 1e-9 and est.class_bound() > 1 - 0.5 * sum(diffs)
    est.observe(torch.full((100,), 0.9), torch.full((100,), 6))  # a class the reference never predicted
    assert est.class_bound() < 0.01, "all moved out of the reference's classes (less their sampling noise)"


def test_the_class_bound_reads_near_one_on_traffic_in_the_reference_proportions():
    """Sampling noise alone (500 recent against 300 reference predictions, ten classes) moved the
    undebiased bound to 0.87-0.90; shrunk by it, it stays near 1."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randint(0, 10, (300,), generator=g)
    bounds, relative = [], []
    for _ in range(20):
        est = AccuracyEstimator().calibrate(torch.full((300,), 0.9), torch.ones(300, dtype=torch.bool), classes=ref)
        est.observe(torch.full((500,), 0.9), torch.randint(0, 10, (500,), generator=g))
        bounds.append(est.class_bound())
        relative.append(est.relative_bound())
    assert sum(bounds) / len(bounds) > 0.95 and min(bounds) > 0.9, bounds
    # read against its own no-shift reading, the bound discounts unshifted traffic by about nothing
    assert sum(relative) / len(relative) > 0.99 and min(relative) > 0.95, relative


def _points_estimator():
    g = torch.Generator().manual_seed(0)
    ref_points = torch.randn(300, 4, generator=g)
    ref_classes = torch.arange(10).repeat(30)
    est = AccuracyEstimator(window=200).calibrate(torch.rand(300, generator=g) * 0.2 + 0.8,
                                                  torch.ones(300, dtype=torch.bool), classes=ref_classes,
                                                  points=ref_points)
    return est, g


def test_the_class_bound_discounts_the_estimate_only_where_inputs_are_unlike_the_reference():
    """A sure model sending every input to one class: 10% right if the classes sent are the
    reference's. Typical inputs in that class mix are label shift (ATC stands); atypical ones are
    the model's errors (the estimate is ATC times the bound)."""
    est, g = _points_estimator()
    sure = torch.full((200,), 0.99)
    est.observe(sure, torch.zeros(200, dtype=torch.long), torch.randn(200, 4, generator=g))
    assert est.atypical_share() < 0.05 and est.class_bound() < 0.15
    assert est.estimate == est.atc == 1.0, "label shift: the reference's own kind of inputs, ATC stands"
    est.observe(sure, torch.zeros(200, dtype=torch.long), torch.randn(200, 4, generator=g) + 6)
    assert est.atypical_share() == 1.0
    assert est.atc == 1.0 and est.estimate == est.relative_bound() < 0.15
    assert est.relative_bound() == pytest.approx(est.class_bound() / est.status()["class_bound_null"], abs=1e-3)
    moved = 1.0 - 0.5 * 100 / (100 + PRIOR_LABELS)  # ATC moved by what 100 labels observed
    assert est.corrected({"n": 100, "observed": 0.5, "estimated": 1.0}) == pytest.approx(moved * est.relative_bound()), \
        "the labelled view is discounted too"
    status = est.status()
    assert status["atypical_share"] == 1.0 and status["class_bound"] == round(est.class_bound(), 4)
    est.observe(sure[:150], torch.arange(10).repeat(15), torch.randn(150, 4, generator=g))
    assert 0.2 < est.atypical_share() < 0.3 and est.estimate > 0.6, "a quarter atypical: the bound is loose again"


def test_where_inputs_are_atypical_confidence_and_class_mix_count_as_independent_witnesses():
    """Half the predictions below the ATC threshold and the classes moved so that at most about
    half can be right: right only where both allow it, about a quarter (the lower of the two would
    say a half)."""
    est, g = _points_estimator()
    conf = torch.cat([torch.full((100,), 0.99), torch.full((100,), 0.01)])
    classes = torch.cat([torch.zeros(100, dtype=torch.long), torch.arange(10).repeat(10)])
    est.observe(conf, classes, torch.randn(200, 4, generator=g) + 6)
    bound = est.class_bound()
    assert est.atypical_share() == 1.0 and est.atc == 0.5 and 0.3 < bound < 0.7
    assert est.estimate == pytest.approx(0.5 * est.relative_bound()) and est.estimate < min(est.atc, bound)


def test_the_window_marks_round_trip_and_older_states_load():
    est, g = _points_estimator()
    est.observe(torch.full((200,), 0.99), torch.zeros(200, dtype=torch.long), torch.randn(200, 4, generator=g) + 6)
    other, _ = _points_estimator()
    other.load_state_dict(est.state_dict())
    assert other.estimate == est.estimate < 0.15
    old = {k: v for k, v in est.state_dict().items() if k not in ("_classes_state", "_atypical_state")}
    other, _ = _points_estimator()
    other.load_state_dict(old)
    assert other.estimate == other.atc == est.atc, "no marks: no cap until the window refills"


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
            assert accuracy["atypical_share"] > 0.1 and accuracy["estimate"] < accuracy["class_bound"] < 0.7, \
                "many rotated digits are unlike the reference: the estimate is discounted by the bound"
            assert accuracy["estimate"] == pytest.approx(min(accuracy["atc"], accuracy["calibrated"])
                                                         * accuracy["class_bound"] / accuracy["class_bound_null"], abs=1e-3)


def test_digits_sent_one_class_at_a_time_keep_a_trusted_uncapped_estimate(demo_model, reference, digits):
    """Label shift: clean digits in runs of one class. The predicted classes move as far as on the
    rotated digits above, but the inputs are the reference's kind: ATC stands and is trusted."""
    from selfheal_core import ServingModel

    x_ref, y_ref = reference
    _, _, x_te, y_te = digits
    first = y_te < 3
    x, y = resample(x_te[first], y_te[first], 500, seed=5)  # classes 0 to 2 only
    serving = ServingModel(demo_model, x_ref, HealConfig.from_dict({"adapt": False}), reference_targets=y_ref)
    right = []
    for i in range(0, len(x), 16):
        right.append(serving.predict(x[i:i + 16]).argmax(1) == y[i:i + 16])
        serving.drain()
    accuracy = serving.status()["accuracy"]
    assert accuracy["class_bound"] < 0.5 and accuracy["atypical_share"] < ATYPICAL_GATE, accuracy
    assert accuracy["trusted"] is True, accuracy
    assert abs(accuracy["estimate"] - float(torch.cat(right).float().mean())) < 0.05


def test_isotonic_pools_violators_and_interpolates_flat_beyond_the_ends():
    knots = isotonic(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert torch.allclose(knots, torch.tensor([[0.1, 0.25, 0.4], [0.0, 0.5, 1.0]], dtype=torch.float64))
    at = interpolate(torch.tensor([0.0, 0.175, 0.25, 0.9], dtype=torch.float64), knots)
    assert torch.allclose(at, torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(500, generator=g)
    fitted = isotonic(x, (torch.rand(500, generator=g) < x).double())
    assert (fitted.diff(dim=1) >= 0).all(), "confidence and fitted accuracy both non-decreasing"
    assert isotonic(torch.tensor([0.3, 0.3, 0.3]), torch.tensor([1.0, 0.0, 1.0])).shape == (2, 1), "ties pool"


def _overconfident_estimator():
    """A reference where the model is right 80% of the time at any confidence from 0.5 to 1."""
    g = torch.Generator().manual_seed(2)
    conf = torch.rand(1000, generator=g) * 0.5 + 0.5
    return AccuracyEstimator(window=400).calibrate(conf, torch.rand(1000, generator=g) < 0.8), g


def test_the_estimate_is_the_calibrated_confidence_where_the_reference_says_atc_is_too_sure():
    """ATC counts every prediction above its threshold as right; a reference that is wrong at every
    confidence says confident windows are right about 80% of the time (ATC: 1.0)."""
    est, _ = _overconfident_estimator()
    est.observe(torch.full((400,), 0.95))
    assert est.atc == 1.0 and abs(est.calibrated - 0.8) < 0.06 and est.estimate == est.calibrated
    status = est.status()
    assert status["atc"] == 1.0 and status["calibrated"] == round(est.calibrated, 4)
    assert status["method"] == "lower of atc and calibrated confidence"
    est.observe(torch.full((400,), 0.51))
    assert est.estimate == est.atc < 0.1, "below the threshold ATC is the lower"
    old = {k: v for k, v in est.state_dict().items() if k != "_calibration"}
    other = AccuracyEstimator(window=400)
    other.load_state_dict(old)
    assert other.calibrated is None and other.estimate == est.atc, "a state saved without the map: ATC alone"
    other.load_state_dict(est.state_dict())
    assert other.calibrated == est.calibrated


def test_labels_move_each_view_by_what_they_observed_of_it():
    est, _ = _overconfident_estimator()
    est.observe(torch.full((400,), 0.95))
    conf = torch.full((200,), 0.95)
    labelled = LabelledAccuracy()
    labelled.add(torch.rand(200, generator=torch.Generator().manual_seed(3)) < 0.6, est.predicts_correct(conf),
                 est.calibrated_correct(conf))
    summary = labelled.summary()
    assert summary["estimated"] == 1.0 and abs(summary["calibrated"] - est.calibrated) < 1e-3
    corrected = est.corrected(summary)
    shift = (summary["observed"] - summary["calibrated"]) * 200 / 250
    assert abs(corrected - (est.calibrated + shift)) < 1e-3 and corrected < est.estimate - 0.1
    other = LabelledAccuracy()
    other.load_state_dict(labelled.state_dict())
    assert other.summary() == summary
    other.load_state_dict({"_items_state": labelled.state_dict()["_items_state"][:, :2]})
    assert other.summary()["calibrated"] is None, "saved before the calibrated view: ATC's alone"
    assert est.corrected(other.summary()) == min(max(1.0 + (summary["observed"] - 1.0) * 0.8, 0.0), 1.0)
