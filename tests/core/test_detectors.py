"""One shared suite over every detector, plus calibration of the false-alarm rate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from selfheal_core.monitor import (ClassShiftDetector, ConfidenceDetector, ErrorRateDetector, FeatureShiftDetector,
                                   ResidualDetector)


def confidence(ert=2_000, seed=0):
    rng = np.random.default_rng(seed)
    det = ConfidenceDetector(expected_run_time=ert, paths=100).calibrate(rng.beta(0.5, 6, 300))
    clean = lambda r, n: r.beta(0.5, 6, n)  # noqa: E731
    shifted = lambda r, n: r.beta(2, 3, n)  # noqa: E731
    return det, clean, shifted


def error_rate(ert=2_000, seed=0):
    det = ErrorRateDetector(expected_run_time=ert, paths=100).calibrate(0.05)
    clean = lambda r, n: (r.random(n) < 0.05).astype(float)  # noqa: E731
    shifted = lambda r, n: (r.random(n) < 0.30).astype(float)  # noqa: E731
    return det, clean, shifted


def feature_shift(ert=2_000, seed=0):
    """margin=1: the stream is exactly the reference distribution, so no allowance for benign shift."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((12, 12)) / 3  # correlated features
    det = FeatureShiftDetector(expected_run_time=ert, dims=6, margin=1.0, paths=100).calibrate(
        rng.standard_normal((300, 12)) @ mix)
    clean = lambda r, n: r.standard_normal((n, 12)) @ mix  # noqa: E731
    shifted = lambda r, n: (r.standard_normal((n, 12)) + 1.0) @ mix  # noqa: E731
    return det, clean, shifted


def class_shift(ert=2_000, seed=0):
    p = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    rng = np.random.default_rng(seed)
    det = ClassShiftDetector(expected_run_time=ert, margin=1.0, paths=100).calibrate(rng.choice(5, 400, p=p), 5)
    clean = lambda r, n: r.choice(5, n, p=p)  # noqa: E731
    shifted = lambda r, n: r.choice(5, n, p=p[::-1])  # noqa: E731
    return det, clean, shifted


def residual(ert=2_000, seed=0):
    """Squared errors of a regression model: chi-square-like, heavy right tail."""
    rng = np.random.default_rng(seed)
    det = ResidualDetector(expected_run_time=ert, paths=100).calibrate(rng.standard_normal(300) ** 2)
    clean = lambda r, n: r.standard_normal(n) ** 2  # noqa: E731
    shifted = lambda r, n: (2.5 * r.standard_normal(n)) ** 2  # noqa: E731
    return det, clean, shifted


DETECTORS = [confidence, error_rate, feature_shift, class_shift, residual]


def feed(det, values, batch=16):
    alarms = 0
    for i in range(0, len(values), batch):
        alarms += det.update(values[i:i + batch]).drift_detected
    return alarms


@pytest.mark.parametrize("make", DETECTORS)
def test_clean_stream_does_not_fire(make):
    det, clean, _ = make(ert=10_000)
    assert feed(det, clean(np.random.default_rng(1), 1_000)) == 0
    assert det.alarms == 0 and det.score < 1


@pytest.mark.parametrize("make", DETECTORS)
def test_shifted_stream_fires_fast(make):
    det, clean, shifted = make(ert=10_000)
    feed(det, clean(np.random.default_rng(2), 500))
    assert det.alarms == 0
    values = shifted(np.random.default_rng(3), 100)
    first = next((i for i, v in enumerate(values) if det.update(values[i:i + 1]).drift_detected), None)
    assert first is not None and first < 60, f"first alarm after {first} shifted samples, wanted < 60"


@pytest.mark.parametrize("make", DETECTORS)
def test_false_alarm_rate_matches_target(make):
    """Calibration: alarms on 4 references x 20,000 clean samples at ERT 1,000 within 0.5x..2x of 80.

    Several references, because a chart fitted on a sample has its own rate;
    the calibration targets a typical reference.
    """
    alarms = 0
    for seed in range(4):
        det, clean, _ = make(ert=1_000, seed=seed)
        feed(det, clean(np.random.default_rng(100 + seed), 20_000), batch=32)
        alarms += det.alarms
    assert 40 <= alarms <= 160, alarms


@pytest.mark.parametrize("make", DETECTORS)
def test_state_round_trip_and_reset(make):
    det, clean, shifted = make()
    feed(det, np.concatenate([clean(np.random.default_rng(5), 300), shifted(np.random.default_rng(6), 30)]))
    state = det.state_dict()
    other, _, _ = make()
    other.load_state_dict(torch.load(_roundtrip(state), weights_only=True))
    assert other.score == det.score and other.alarms == det.alarms and other.threshold == det.threshold
    nxt = shifted(np.random.default_rng(7), 20)
    assert det.update(nxt).score == other.update(nxt).score
    det.reset()
    assert det.score == 0 and det.alarms == 0 and det.threshold == other.threshold  # calibration kept


@pytest.mark.parametrize("make", DETECTORS)
@pytest.mark.parametrize("damage", ["nan", "inf", "extra_dim", "too_few_dims", "text"])
def test_bad_input_rejected_state_kept(make, damage):
    det, clean, _ = make()
    feed(det, clean(np.random.default_rng(8), 50))
    good = clean(np.random.default_rng(9), 4).astype(float)
    bad = {"nan": np.where(np.arange(good.size).reshape(good.shape) == 0, np.nan, good),
           "inf": np.full_like(good, np.inf),
           "extra_dim": good[None],
           "too_few_dims": good.reshape(-1)[0],
           "text": np.array(["a"] * len(good))}[damage]
    before = det.state_dict()
    with pytest.raises(ValueError):
        det.update(bad)
    assert same(det.state_dict(), before)


def test_wrong_width_and_out_of_range_classes_rejected():
    det, clean, _ = feature_shift()
    with pytest.raises(ValueError, match="size 12"):
        det.update(np.zeros((3, 5)))
    det, clean, _ = class_shift()
    for bad in (np.array([5]), np.array([-1]), np.array([1.5])):
        with pytest.raises(ValueError, match="integers in"):
            det.update(bad)


def test_error_rate_rejects_non_binary():
    det, _, _ = error_rate()
    with pytest.raises(ValueError, match="0 \\(correct\\) or 1"):
        det.update(np.array([0.5]))


@pytest.mark.parametrize("kwargs", [{"expected_run_time": 1}, {"slack": 0}])
def test_bad_options_fail_at_construction(kwargs):
    with pytest.raises(ValueError):
        ConfidenceDetector(**kwargs)


def same(a, b) -> bool:
    """Equality of nested states holding tensors."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_feature_axes_agree_across_processes_to_float_noise_and_old_states_load():
    """A learner and a worker calibrate on the same reference read in other batch sizes (last bits
    differ): their axes' digests agree, so one's reference statistics install in the other; axes
    of other features are refused. A state saved with the (D,) centre and (D, k) projection loads
    as the same whitening."""
    from selfheal_core.monitor.feature_shift import FeatureShiftDetector

    g = torch.Generator().manual_seed(3)
    feats = torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g,
                                                                                  dtype=torch.float64)
    worker = FeatureShiftDetector(expected_run_time=1_000, paths=50).calibrate(feats)
    noisy = feats * (1 + 1e-7 * torch.randn(feats.shape, generator=g, dtype=torch.float64))
    learner = FeatureShiftDetector(expected_run_time=1_000, paths=50).calibrate(noisy, threshold=1.0)
    moved = feats * 1.3 + 0.5
    worker.load_reference(learner.rebase(moved).reference_state())
    assert torch.allclose(worker._center, learner._center) and torch.allclose(worker._white, learner._white)
    stranger = FeatureShiftDetector(expected_run_time=1_000, paths=50).calibrate(
        torch.randn(300, 16, generator=g, dtype=torch.float64), threshold=1.0)
    kept = worker.reference_state()
    try:
        worker.load_reference(stranger.reference_state())
    except ValueError as exc:
        assert "axes" in str(exc)
    else:
        raise AssertionError("statistics fitted along other axes were installed")
    assert all(torch.equal(kept[k], v) for k, v in worker.reference_state().items())
    # the format before the axes were kept apart
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    old = {k: v for k, v in worker.state_dict().items() if k not in ("_axes", "_center", "_white")}
    proj = worker._axes @ worker._white
    old.update(_proj=proj, _center=feats.mean(0))
    restored = FeatureShiftDetector(expected_run_time=1_000, paths=50)
    restored.load_state_dict(old)
    want = (x - old["_center"]) @ proj
    assert torch.allclose(torch.from_numpy(restored._whiten(x)), want, atol=1e-9)


def test_a_rebase_along_the_calibrated_axes_keeps_an_update_from_reading_as_drift():
    """After an update the same inputs give other features (here scaled and shifted per
    dimension and mixed, as norm affine weights move them): unrebased, the chart alarms at once;
    rebased on the reference through the new weights (centre and whitening along the axes fixed
    at calibration), a stream like the reference stays quiet, and a real shift still alarms."""
    from selfheal_core.monitor import FeatureShiftDetector

    g = torch.Generator().manual_seed(11)
    mix = torch.eye(16, dtype=torch.float64) + 0.3 * torch.randn(16, 16, generator=g, dtype=torch.float64)
    scale = 1 + torch.rand(16, generator=g, dtype=torch.float64)

    def features(n: int) -> torch.Tensor:
        return torch.randn(n, 16, generator=g, dtype=torch.float64) @ mix

    def updated(f: torch.Tensor) -> torch.Tensor:
        return f * scale + 0.8

    ref = features(300)
    stale = FeatureShiftDetector(expected_run_time=10_000, paths=100).calibrate(ref)
    rebased = FeatureShiftDetector(expected_run_time=10_000, paths=100).calibrate(ref).rebase(updated(ref))
    stream = updated(features(1_000))
    stale.update(stream[:200])
    rebased.update(stream)
    assert stale.alarms > 0 and rebased.alarms == 0
    rebased.update(updated(features(300)) + 0.5)
    assert rebased.alarms > 0
