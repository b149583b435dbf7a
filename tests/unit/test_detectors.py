"""One shared suite over every detector, plus calibration of the false-alarm rate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from selfheal_core.monitor import ConfidenceDetector, ErrorRateDetector


def confidence(ert=2_000):
    rng = np.random.default_rng(0)
    det = ConfidenceDetector(expected_run_time=ert, paths=100).calibrate(rng.beta(0.5, 6, 300))
    clean = lambda r, n: r.beta(0.5, 6, n)  # noqa: E731
    shifted = lambda r, n: r.beta(2, 3, n)  # noqa: E731
    return det, clean, shifted


def error_rate(ert=2_000):
    det = ErrorRateDetector(expected_run_time=ert, paths=100).calibrate(0.05)
    clean = lambda r, n: (r.random(n) < 0.05).astype(float)  # noqa: E731
    shifted = lambda r, n: (r.random(n) < 0.30).astype(float)  # noqa: E731
    return det, clean, shifted


DETECTORS = [confidence, error_rate]


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
    """Calibration: alarms on 40,000 clean samples at ERT 1,000 within 0.5x..2x of the expected 40."""
    det, clean, _ = make(ert=1_000)
    alarms = feed(det, clean(np.random.default_rng(4), 40_000), batch=32)
    assert det.alarms >= alarms  # several alarms can fall in one batch
    assert 20 <= det.alarms <= 80, det.alarms


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
@pytest.mark.parametrize("bad", [np.array([0.1, np.nan]), np.array([np.inf]), np.zeros((2, 2))])
def test_bad_input_rejected_state_kept(make, bad):
    det, clean, _ = make()
    feed(det, clean(np.random.default_rng(8), 50))
    before = det.state_dict()
    with pytest.raises(ValueError):
        det.update(bad)
    assert same(det.state_dict(), before)


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
