"""Drift monitor: calibrated online detectors combined into one DriftState."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from selfheal_core.config import MonitorConfig
from selfheal_core.monitor.base import CusumDetector, Detector, MewmaDetector, calibrate_threshold
from selfheal_core.monitor.class_shift import ClassShiftDetector
from selfheal_core.monitor.confidence import ConfidenceDetector, normalized_entropy
from selfheal_core.monitor.error_rate import ErrorRateDetector
from selfheal_core.monitor.feature_shift import FeatureShiftDetector
from selfheal_core.state import StateMixin

__all__ = ["Monitor", "DriftState", "Detector", "CusumDetector", "MewmaDetector", "ConfidenceDetector",
           "FeatureShiftDetector", "ClassShiftDetector", "ErrorRateDetector", "calibrate_threshold",
           "normalized_entropy"]


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
    """Label-free detectors on every prediction, an error-rate detector on feedback.

    - confidence: CUSUM on entropy ranks (the model is less sure);
    - feature_shift: MEWMA on whitened penultimate features (inputs moved);
    - class_shift: MEWMA on predicted classes (label shift, black-box);
    - error_rate: Bernoulli CUSUM on feedback errors (concept drift).

    Each is calibrated on the reference to `expected_run_time` samples between
    false alarms. A drift episode starts at the first alarm of any detector and
    ends after `settle_samples` predictions with no new alarm (the correction
    it triggered has settled).
    """

    _state_keys = ("_predictions", "_labels", "_since", "_last_alarm", "_episodes", "_firing")

    def __init__(self, config: MonitorConfig = MonitorConfig()) -> None:
        self.config = config
        c = config
        self.detectors: dict[str, Detector] = {
            "confidence": ConfidenceDetector(c.expected_run_time, c.cusum_slack, c.calibration_paths, c.seed),
            "feature_shift": FeatureShiftDetector(c.expected_run_time, c.feature_dims, c.ewma_lambda,
                                                  c.calibration_margin, paths=c.calibration_paths, seed=c.seed),
            "class_shift": ClassShiftDetector(c.expected_run_time, c.ewma_lambda, c.calibration_margin,
                                              c.calibration_paths, c.seed),
            "error_rate": ErrorRateDetector(c.expected_run_time, c.error_rate_shift, c.error_rate_floor,
                                            c.calibration_paths, c.seed),
        }
        self._reset()

    def _reset(self) -> None:
        self._predictions = 0  # predictions observed
        self._labels = 0  # labels observed
        self._since: int | None = None
        self._last_alarm = -1
        self._episodes = 0
        self._firing: list[str] = []

    def calibrate(self, reference_probs: torch.Tensor, reference_features: torch.Tensor | None,
                  baseline_error: float) -> "Monitor":
        """Calibrate every detector on the model's reference outputs: probabilities (R, C), features (R, F)."""
        d = self.detectors
        d["confidence"].calibrate(normalized_entropy(reference_probs))
        d["class_shift"].calibrate(reference_probs.argmax(1), reference_probs.shape[1])
        if reference_features is not None:
            d["feature_shift"].calibrate(reference_features)
        d["error_rate"].calibrate(baseline_error)
        return self

    def rebase(self, reference_probs: torch.Tensor, reference_features: torch.Tensor | None) -> None:
        """After a labelled update: the confidence and feature charts re-read the reference through
        the new weights (their thresholds stay), so the update itself is not reported as drift."""
        self.prepare_rebase(reference_probs, reference_features)()

    def prepare_rebase(self, reference_probs: torch.Tensor,
                       reference_features: torch.Tensor | None) -> Callable[[], None]:
        """`rebase` in two steps: fit the new reference statistics now, on copies (the slow part:
        an eigendecomposition), and return a function that installs them (fast), so a server can
        fit outside the lock its requests take and install inside it."""
        fitted = {"confidence": (copy.copy(self.detectors["confidence"]).rebase(normalized_entropy(reference_probs)),
                                 ("_ref",))}
        if reference_features is not None and self.detectors["feature_shift"].calibrated:
            fitted["feature_shift"] = (copy.copy(self.detectors["feature_shift"]).rebase(reference_features),
                                       ("_center", "_proj"))

        def install() -> None:
            for name, (det, attrs) in fitted.items():
                for attr in attrs:
                    setattr(self.detectors[name], attr, getattr(det, attr))
        return install

    def observe_predictions(self, probs: torch.Tensor, features: torch.Tensor | None = None) -> list[str]:
        """Feed probabilities (B, C) and features (B, F); returns the detectors that alarmed, in the
        order of their first alarm within the batch."""
        d = self.detectors
        d["confidence"].update(normalized_entropy(probs))
        d["class_shift"].update(probs.argmax(1))
        names = ["confidence", "class_shift"]
        if features is not None and d["feature_shift"].calibrated:
            d["feature_shift"].update(features)
            names.append("feature_shift")
        self._predictions += probs.shape[0]
        return self._after_update(names)

    def observe_errors(self, errors: torch.Tensor) -> list[str]:
        """Feed error indicators (B,) for labelled feedback; returns ["error_rate"] on an alarm."""
        self.detectors["error_rate"].update(errors.to(torch.float64))
        self._labels += errors.shape[0]
        return self._after_update(["error_rate"])

    def _after_update(self, names: list[str]) -> list[str]:
        # In order of each detector's first alarm within the batch (ties: in `names` order), so a
        # batch tells what a sample-by-sample stream would have told first.
        fired = sorted((n for n in names if self.detectors[n].drift_detected),
                       key=lambda n: self.detectors[n].first_alarm)
        if fired:
            if self._since is None:
                self._since, self._episodes = self._predictions, self._episodes + 1
            self._firing += [n for n in fired if n not in self._firing]
            self._last_alarm = self._predictions
        elif self._since is not None and self._predictions - self._last_alarm >= self.config.settle_samples:
            self._since, self._firing = None, []  # settled: end of the episode
        return fired

    @property
    def drift_detected(self) -> bool:
        return self._since is not None

    @property
    def state(self) -> DriftState:
        return DriftState(
            detected=self.drift_detected,
            firing=list(self._firing),
            scores={name: round(det.score, 4) for name, det in self.detectors.items()},
            since=self._since,
            episodes=self._episodes,
        )

    def reset(self) -> None:
        """Forget running statistics and episodes; keep calibration."""
        for det in self.detectors.values():
            det.reset()
        self._reset()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["detectors"] = {name: det.state_dict() for name, det in self.detectors.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        dets = state.pop("detectors", None)
        if not isinstance(dets, dict) or set(dets) != set(self.detectors):
            raise ValueError(f"Monitor state needs detector states for {sorted(self.detectors)}")
        super().load_state_dict(state)
        for name, det in self.detectors.items():
            det.load_state_dict(dets[name])
