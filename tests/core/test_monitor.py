"""Monitor: the task's detectors combined into one DriftState with episodes that settle."""
from __future__ import annotations

import torch

from selfheal_core.config import MonitorConfig
from selfheal_core.monitor import (LABEL_FREE, ON_FEEDBACK, DetectorName, Monitor, ReferenceView, merge_drift)
from selfheal_core.task import Task, TaskKind

CLS5 = Task(TaskKind.CLASSIFICATION, 5)


def probs_for(classes: torch.Tensor, confidence: float, num_classes: int = 5) -> torch.Tensor:
    p = torch.full((len(classes), num_classes), (1 - confidence) / (num_classes - 1))
    p[torch.arange(len(classes)), classes] = confidence
    return p


def make_monitor(kinds=LABEL_FREE | ON_FEEDBACK, **kw):
    g = torch.Generator().manual_seed(0)
    cls = torch.randint(0, 5, (300,), generator=g)
    ref_probs = probs_for(cls, 0.9) + torch.rand(300, 5, generator=g) * 0.02
    ref_probs = ref_probs / ref_probs.sum(1, keepdim=True)
    feats = torch.randn(300, 8, generator=g, dtype=torch.float64)
    cfg = MonitorConfig(expected_run_time=5_000, settle_samples=200, calibration_paths=100, **kw)
    view = ReferenceView(probs=ref_probs, features=feats, errors=(torch.rand(300, generator=g) < 0.05).double())
    return Monitor(cfg, CLS5, kinds).calibrate(view), g


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
        fired += mon.observe_errors((torch.rand(10, generator=g) < 0.5).double())
    assert "error_rate" in fired and mon.state.detected
    other, _ = make_monitor()
    other.load_state_dict(mon.state_dict())
    assert other.state == mon.state
    mon.reset()
    assert not mon.state.detected and mon.detectors[DetectorName.CONFIDENCE].calibrated


def test_alarms_are_reported_in_order_of_first_alarm_within_a_batch():
    """A batch holding a class-mix change followed by an input change reports class_shift first."""
    g = torch.Generator().manual_seed(0)
    ref = torch.softmax(4 * torch.randn(600, 4, generator=g), 1)
    mon = Monitor(MonitorConfig(expected_run_time=2000), Task(TaskKind.CLASSIFICATION, 4)).calibrate(
        ReferenceView(probs=ref))
    assert mon.missing == {"feature_shift": mon.missing["feature_shift"]}, "no features: named, not silent"
    one_class = torch.softmax(torch.tensor([[6.0, 0, 0, 0]]) + 0.1 * torch.randn(150, 4, generator=g), 1)
    unsure = torch.full((150, 4), 0.25)
    fired = mon.observe_predictions(torch.cat([one_class, unsure]))
    assert fired == ["class_shift", "confidence"], fired
    mon.reset()
    fired = mon.observe_predictions(torch.cat([unsure, one_class]))
    assert fired[0] == "confidence", fired


def test_regression_watches_outputs_features_and_residuals():
    g = torch.Generator().manual_seed(1)
    task = Task(TaskKind.REGRESSION, 1)
    values = torch.randn(300, 1, generator=g) * 10 + 50
    feats = torch.randn(300, 6, generator=g, dtype=torch.float64)
    errors = torch.randn(300, generator=g, dtype=torch.float64) ** 2
    mon = Monitor(MonitorConfig(expected_run_time=5_000, calibration_paths=100), task, LABEL_FREE | ON_FEEDBACK)
    mon.calibrate(ReferenceView(values=values, features=feats, errors=errors))
    assert set(mon.detectors) == {DetectorName.OUTPUT_SHIFT, DetectorName.FEATURE_SHIFT, DetectorName.RESIDUAL}
    for _ in range(20):
        assert mon.observe_predictions(values=torch.randn(16, 1, generator=g) * 10 + 50,
                                       features=torch.randn(16, 6, generator=g, dtype=torch.float64)) == []
    fired = []
    for _ in range(10):
        fired += mon.observe_predictions(values=torch.randn(16, 1, generator=g) * 10 + 65,
                                         features=torch.randn(16, 6, generator=g, dtype=torch.float64))
    assert "output_shift" in fired
    fired = []
    for _ in range(10):
        fired += mon.observe_errors((3 * torch.randn(10, generator=g, dtype=torch.float64)) ** 2)
    assert "residual" in fired


def test_regression_without_reference_targets_names_the_missing_residual_detector():
    task = Task(TaskKind.REGRESSION, 2)
    mon = Monitor(MonitorConfig(calibration_paths=100), task, ON_FEEDBACK).calibrate(ReferenceView())
    assert not mon.detectors and "reference targets" in mon.missing["residual"]
    assert mon.observe_errors(torch.ones(4, dtype=torch.float64)) == []


def test_merge_drift_combines_serving_and_feedback_views():
    serving = {"detected": True, "firing": ["confidence"], "scores": {"confidence": 1.2}, "since": 40, "episodes": 1}
    feedback = {"detected": False, "firing": [], "scores": {"error_rate": 0.3}, "since": None, "episodes": 0}
    merged = merge_drift(serving, feedback)
    assert merged["detected"] and merged["firing"] == ["confidence"] and merged["scores"] == {
        "confidence": 1.2, "error_rate": 0.3} and merged["since"] == 40


def test_rebase_hands_reference_statistics_through_public_state_and_refuses_a_mismatch():
    """fit_rebase fits copies; install_rebase puts them in through each detector's load_reference,
    and a value of the wrong shape changes no detector (checked before anything is written)."""
    mon, g = make_monitor()
    other, _ = make_monitor()
    before = {name: det.reference_state() for name, det in mon.detectors.items()}
    moved = ReferenceView(probs=probs_for(torch.randint(0, 5, (300,), generator=g), 0.6),
                          features=torch.randn(300, 8, generator=g, dtype=torch.float64) + 2.0)
    values = mon.fit_rebase(moved)
    assert set(values) == {"confidence", "feature_shift"}
    for name, det in mon.detectors.items():  # fitting touched nothing
        assert all(torch.equal(v, det.reference_state()[k]) for k, v in before[name].items())
    other.install_rebase(values)
    assert torch.equal(other.detectors[DetectorName.FEATURE_SHIFT].reference_state()["_center"],
                       values["feature_shift"]["_center"])
    bad = {"confidence": values["confidence"], "feature_shift": {**values["feature_shift"],
                                                                 "_white": torch.zeros(3, 3)}}
    try:
        mon.install_rebase(bad)
    except ValueError as e:
        assert "_white" in str(e)
    else:
        raise AssertionError("a reference of the wrong shape was installed")
    for name, det in mon.detectors.items():
        assert all(torch.equal(v, det.reference_state()[k]) for k, v in before[name].items())


def test_thresholds_simulated_once_are_shared_through_the_calibration_cache(tmp_path, monkeypatch):
    """Another process (an empty in-process memo) reads what the first simulated; a damaged or
    foreign entry is simulated again; without the folder set nothing is written."""
    from selfheal_core.monitor import monitor as monitor_module

    monkeypatch.setattr(monitor_module, "_CALIBRATED", type(monitor_module._CALIBRATED)())
    monkeypatch.setenv(monitor_module.CALIBRATION_CACHE_ENV, str(tmp_path))
    first, _ = make_monitor(seed=11)
    assert first.calibrated_from == "simulation"
    [entry] = list(tmp_path.glob("*.json"))
    assert entry.name == f"{first.calibration()['key']}.json"

    monitor_module._CALIBRATED.clear()  # as in a process started later
    again, _ = make_monitor(seed=11)
    assert again.calibrated_from == "simulation (earlier, in the calibration cache)"
    assert again.calibration() == first.calibration()

    for damage in ('{"confidence": "high"}', "[1", '{"confidence": NaN}'):
        entry.write_text(damage)
        monitor_module._CALIBRATED.clear()
        redone, _ = make_monitor(seed=11)
        assert redone.calibrated_from == "simulation" and redone.calibration() == first.calibration(), damage

    monkeypatch.delenv(monitor_module.CALIBRATION_CACHE_ENV)
    entry.unlink()
    monitor_module._CALIBRATED.clear()
    assert make_monitor(seed=11)[0].calibrated_from == "simulation" and not list(tmp_path.iterdir())
