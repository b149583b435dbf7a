"""Drift monitor: calibrated online detectors combined into one DriftState."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from selfheal_core.config import MonitorConfig
from selfheal_core.monitor.base import CusumDetector, calibrate_threshold
from selfheal_core.monitor.confidence import ConfidenceDetector, normalized_entropy
from selfheal_core.monitor.error_rate import ErrorRateDetector
from selfheal_core.state import StateMixin

__all__ = ["Monitor", "DriftState", "ConfidenceDetector", "ErrorRateDetector", "CusumDetector",
           "calibrate_threshold", "normalized_entropy"]


@dataclass
class DriftState:
    """What the monitor believes now: JSON-able through `as_dict()`."""

    detected: bool = False  # an alarm was raised and has not settled yet
    firing: list[str] = field(default_factory=list)  # detectors that alarmed in this episode
    scores: dict[str, float] = field(default_factory=dict)  # CUSUM / threshold per detector
    since: int | None = None  # prediction count at the first alarm of this episode
    episodes: int = 0  # drift episodes so far

    def as_dict(self) -> dict:
        return asdict(self)


class Monitor(StateMixin):
    """Confidence detector on predictions, error-rate detector on feedback.

    A drift episode starts at the first alarm of any detector and ends after
    `settle_samples` predictions with no new alarm (the correction has settled).
    """

    _state_keys = ("_predictions", "_labels", "_since", "_last_alarm", "_episodes", "_firing")

    def __init__(self, config: MonitorConfig = MonitorConfig()) -> None:
        self.config = config
        c = config
        self.confidence = ConfidenceDetector(c.expected_run_time, c.cusum_slack, c.calibration_paths, c.seed)
        self.error_rate = ErrorRateDetector(c.expected_run_time, c.error_rate_shift, c.error_rate_floor,
                                            c.calibration_paths, c.seed)
        self._reset()

    def _reset(self) -> None:
        self._predictions = 0  # predictions observed
        self._labels = 0  # labels observed
        self._since: int | None = None
        self._last_alarm = -1
        self._episodes = 0
        self._firing: list[str] = []

    def calibrate(self, reference_probs: torch.Tensor, baseline_error: float) -> "Monitor":
        """Calibrate every detector on the model's reference predictions (R, C) and error rate."""
        self.confidence.calibrate(normalized_entropy(reference_probs))
        self.error_rate.calibrate(baseline_error)
        return self

    def observe_predictions(self, probs: torch.Tensor) -> bool:
        """Feed predictive probabilities (B, C); True when this batch raised a new alarm."""
        self.confidence.update(normalized_entropy(probs))
        self._predictions += probs.shape[0]
        return self._after_update("confidence", self.confidence)

    def observe_errors(self, errors: torch.Tensor) -> bool:
        """Feed error indicators (B,) for labelled feedback; True when an alarm was raised."""
        self.error_rate.update(errors.to(torch.float64))
        self._labels += errors.shape[0]
        return self._after_update("error_rate", self.error_rate)

    def _after_update(self, name: str, det: CusumDetector) -> bool:
        if det.drift_detected:
            if self._since is None:
                self._since, self._episodes = self._predictions, self._episodes + 1
            if name not in self._firing:
                self._firing.append(name)
            self._last_alarm = self._predictions
        elif self._since is not None and self._predictions - self._last_alarm >= self.config.settle_samples:
            self._since, self._firing = None, []  # settled: end of the episode
        return det.drift_detected

    @property
    def drift_detected(self) -> bool:
        return self._since is not None

    @property
    def state(self) -> DriftState:
        return DriftState(
            detected=self.drift_detected,
            firing=list(self._firing),
            scores={"confidence": round(self.confidence.score, 4), "error_rate": round(self.error_rate.score, 4)},
            since=self._since,
            episodes=self._episodes,
        )

    def reset(self) -> None:
        """Forget running statistics and episodes; keep calibration."""
        self.confidence.reset()
        self.error_rate.reset()
        self._reset()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["confidence"] = self.confidence.state_dict()
        state["error_rate"] = self.error_rate.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        conf, err = state.pop("confidence", None), state.pop("error_rate", None)
        if conf is None or err is None:
            raise ValueError("Monitor state lacks detector states")
        super().load_state_dict(state)
        self.confidence.load_state_dict(conf)
        self.error_rate.load_state_dict(err)
