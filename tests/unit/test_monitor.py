"""Monitor: detectors combined into one DriftState with episodes that settle."""
from __future__ import annotations

import torch

from selfheal_core.config import MonitorConfig
from selfheal_core.monitor import Monitor


def probs_for(classes: torch.Tensor, confidence: float, num_classes: int = 5) -> torch.Tensor:
    p = torch.full((len(classes), num_classes), (1 - confidence) / (num_classes - 1))
    p[torch.arange(len(classes)), classes] = confidence
    return p


def make_monitor(**kw):
    g = torch.Generator().manual_seed(0)
    cls = torch.randint(0, 5, (300,), generator=g)
    ref_probs = probs_for(cls, 0.9) + torch.rand(300, 5, generator=g) * 0.02
    ref_probs = ref_probs / ref_probs.sum(1, keepdim=True)
    feats = torch.randn(300, 8, generator=g, dtype=torch.float64)
    cfg = MonitorConfig(expected_run_time=5_000, settle_samples=200, calibration_paths=100, **kw)
    return Monitor(cfg).calibrate(ref_probs, feats, baseline_error=0.05), g


def test_episode_starts_on_shift_and_settles():
    mon, g = make_monitor()
    for _ in range(20):
        cls = torch.randint(0, 5, (16,), generator=g)
        assert mon.observe_predictions(probs_for(cls, 0.9), torch.randn(16, 8, generator=g)) == []
    assert not mon.state.detected
    fired = []
    for _ in range(5):  # features move, predictions stay confident
        cls = torch.randint(0, 5, (16,), generator=g)
        fired += mon.observe_predictions(probs_for(cls, 0.9), torch.randn(16, 8, generator=g) + 1.5)
    st = mon.state
    assert st.detected and "feature_shift" in fired and 320 < st.since <= 400 and st.episodes == 1
    assert set(st.scores) == {"confidence", "feature_shift", "class_shift", "error_rate"}
    for _ in range(20):  # back to normal: quiet for settle_samples, the episode ends
        cls = torch.randint(0, 5, (16,), generator=g)
        mon.observe_predictions(probs_for(cls, 0.9), torch.randn(16, 8, generator=g))
    assert not mon.state.detected and mon.state.episodes == 1


def test_label_shift_fires_class_detector():
    mon, g = make_monitor()
    fired = []
    for _ in range(20):
        fired += mon.observe_predictions(probs_for(torch.zeros(16, dtype=torch.long), 0.9),
                                         torch.randn(16, 8, generator=g))
    assert "class_shift" in fired and "feature_shift" not in fired


def test_error_rate_and_round_trip():
    mon, g = make_monitor()
    fired = []
    for _ in range(30):
        fired += mon.observe_errors(torch.rand(10, generator=g) < 0.5)
    assert "error_rate" in fired and mon.state.detected
    other, _ = make_monitor()
    other.load_state_dict(mon.state_dict())
    assert other.state == mon.state
    mon.reset()
    assert not mon.state.detected and mon.detectors["confidence"].calibrated


def test_alarms_are_reported_in_order_of_first_alarm_within_a_batch():
    """A batch holding a class-mix change followed by an input change reports class_shift first."""
    g = torch.Generator().manual_seed(0)
    ref = torch.softmax(4 * torch.randn(600, 4, generator=g), 1)
    mon = Monitor(MonitorConfig(expected_run_time=2000)).calibrate(ref, None, 0.0)
    one_class = torch.softmax(torch.tensor([[6.0, 0, 0, 0]]) + 0.1 * torch.randn(150, 4, generator=g), 1)
    unsure = torch.full((150, 4), 0.25)
    fired = mon.observe_predictions(torch.cat([one_class, unsure]))
    assert fired == ["class_shift", "confidence"], fired
    mon.reset()
    fired = mon.observe_predictions(torch.cat([unsure, one_class]))
    assert fired[0] == "confidence", fired
