"""Drift monitor: the task's calibrated online detectors combined into one DriftState."""
from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

import torch

from selfheal_core.config import MonitorConfig
from selfheal_core.monitor.base import Detector
from selfheal_core.monitor.class_shift import ClassShiftDetector
from selfheal_core.monitor.confidence import ConfidenceDetector, normalized_entropy
from selfheal_core.monitor.error_rate import ErrorRateDetector
from selfheal_core.monitor.feature_shift import FeatureShiftDetector
from selfheal_core.monitor.residual import ResidualDetector
from selfheal_core.state import StateMixin
from selfheal_core.task import Task

log = logging.getLogger(__name__)


class DetectorName(str, Enum):
    CONFIDENCE = "confidence"  # classifiers: the model is less sure (entropy ranks)
    FEATURE_SHIFT = "feature_shift"  # penultimate features (or inputs) moved
    CLASS_SHIFT = "class_shift"  # classifiers: predicted classes moved (label shift)
    OUTPUT_SHIFT = "output_shift"  # regression: predicted values moved
    ERROR_RATE = "error_rate"  # classifiers: feedback says the model errs more
    RESIDUAL = "residual"  # regression: feedback errors grew


LABEL_FREE = frozenset({DetectorName.CONFIDENCE, DetectorName.FEATURE_SHIFT, DetectorName.CLASS_SHIFT,
                        DetectorName.OUTPUT_SHIFT})
ON_FEEDBACK = frozenset({DetectorName.ERROR_RATE, DetectorName.RESIDUAL})
INPUT_SHIFT = frozenset({DetectorName.CONFIDENCE, DetectorName.FEATURE_SHIFT})  # the inputs themselves moved
UNUSED_THRESHOLD = float.fromhex("0x1.fffffffffffffp+1023")  # `fit_reference`: finite (calibrated), never crossed


@dataclass(frozen=True)
class ReferenceView:
    """The model's view of its reference sample: what detectors are calibrated on."""

    probs: torch.Tensor | None = None  # (R, C) classifiers
    features: torch.Tensor | None = None  # (R, F) float64: penultimate features or pooled inputs
    values: torch.Tensor | None = None  # (R, D) regression outputs
    errors: torch.Tensor | None = None  # (R,) per-sample errors against reference labels (None: no labels)


@dataclass
class DriftState:
    """What the monitor believes now: JSON-able through `as_dict()`."""

    detected: bool = False  # an alarm was raised and has not settled yet
    firing: list[str] = field(default_factory=list)  # detectors that alarmed in this episode
    scores: dict[str, float] = field(default_factory=dict)  # statistic / threshold per detector
    since: int | None = None  # sample count at the first alarm of this episode
    episodes: int = 0  # drift episodes so far

    def as_dict(self) -> dict:
        return asdict(self)


def merge_drift(*states: dict) -> dict:
    """One drift summary from several monitors' `DriftState.as_dict()` (serving and feedback)."""
    states = tuple(s for s in states if s)
    out = {"detected": any(s.get("detected") for s in states), "firing": [], "scores": {},
           "since": None, "episodes": sum(s.get("episodes", 0) for s in states)}
    for s in states:
        out["firing"] += [f for f in s.get("firing", []) if f not in out["firing"]]
        out["scores"].update(s.get("scores", {}))
        if s.get("since") is not None:
            out["since"] = s["since"] if out["since"] is None else min(out["since"], s["since"])
    return out


# Thresholds simulated in this process, by key: a second monitor on the same reference and settings
# (a reset, a test, a benchmark's next method) reuses them instead of simulating again. Bounded.
_CALIBRATED: "OrderedDict[str, dict[str, float]]" = OrderedDict()
# A folder shared by the processes of one run (the test suite sets it for itself and every server,
# learner and benchmark it starts): thresholds simulated by one are read by the others, one small
# JSON file per key. Unset (the default), nothing is read or written. A simulation costs 1-8 CPU-s
# and the suite simulated the same few references a hundred times, in a hundred processes.
CALIBRATION_CACHE_ENV = "SELFHEAL_CALIBRATION_CACHE"


def _recall(key: str) -> dict[str, float] | None:
    """Thresholds simulated before for `key`: in this process, or in the shared folder if set."""
    if key in _CALIBRATED:
        return _CALIBRATED[key]
    folder = os.environ.get(CALIBRATION_CACHE_ENV)
    if not folder:
        return None
    try:
        stored = json.loads((Path(folder) / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None  # absent, or not readable: simulate
    ok = isinstance(stored, dict) and all(isinstance(v, float) and math.isfinite(v) for v in stored.values())
    return stored if ok else None


def _remember(key: str, thresholds: dict[str, float]) -> None:
    _CALIBRATED[key] = thresholds
    while len(_CALIBRATED) > 16:
        _CALIBRATED.popitem(last=False)
    folder = os.environ.get(CALIBRATION_CACHE_ENV)
    if folder:
        try:  # written whole, then renamed: a reader sees the file complete or not at all
            path = Path(folder) / f"{key}.json"
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(thresholds))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("calibration cache %s not written: %s", folder, exc)


class Monitor(StateMixin):
    """Label-free detectors on every prediction and/or error detectors on feedback.

    Which detectors exist follows the task (`kinds` picks the label-free ones, the feedback
    ones, or both); a detector whose data the model or reference cannot give (features of a
    model without a head: inputs instead; errors without reference labels: a floor for
    classifiers, none for regression) is left out and says so in `missing`. Each is
    calibrated on the reference to `expected_run_time` samples between false alarms. A
    drift episode starts at the first alarm of any detector and ends after `settle_samples`
    samples with no new alarm.
    """

    _state_keys = ("_samples", "_since", "_last_alarm", "_episodes", "_firing")

    def __init__(self, config: MonitorConfig, task: Task, kinds: frozenset[DetectorName] = LABEL_FREE) -> None:
        self.config = c = config
        self.task = task
        wanted = {DetectorName.CONFIDENCE, DetectorName.CLASS_SHIFT, DetectorName.ERROR_RATE} if task.is_classifier \
            else {DetectorName.OUTPUT_SHIFT, DetectorName.RESIDUAL}
        wanted = (wanted | {DetectorName.FEATURE_SHIFT}) & set(kinds)
        make: dict[DetectorName, Callable[[], Detector]] = {
            DetectorName.CONFIDENCE: lambda: ConfidenceDetector(c.expected_run_time, c.cusum_slack,
                                                                c.calibration_paths, c.seed),
            DetectorName.FEATURE_SHIFT: lambda: FeatureShiftDetector(c.expected_run_time, c.feature_dims, c.ewma_lambda,
                                                                     c.calibration_margin, c.calibration_paths, c.seed),
            DetectorName.OUTPUT_SHIFT: lambda: FeatureShiftDetector(c.expected_run_time, c.feature_dims, c.ewma_lambda,
                                                                    c.calibration_margin, c.calibration_paths, c.seed),
            DetectorName.CLASS_SHIFT: lambda: ClassShiftDetector(c.expected_run_time, c.ewma_lambda, c.calibration_margin,
                                                                 c.calibration_paths, c.seed),
            DetectorName.ERROR_RATE: lambda: ErrorRateDetector(c.expected_run_time, c.error_rate_shift,
                                                               c.error_rate_floor, c.calibration_paths, c.seed),
            DetectorName.RESIDUAL: lambda: ResidualDetector(c.expected_run_time, c.cusum_slack, c.calibration_paths,
                                                            c.seed),
        }
        self.detectors: dict[DetectorName, Detector] = {name: make[name]() for name in DetectorName if name in wanted}
        self.missing: dict[str, str] = {}  # detector -> why it is not watching
        self.calibrated_from = "not calibrated"
        self._key = ""
        self._reset()

    def _reset(self) -> None:
        self._samples = 0  # predictions (or labels) observed
        self._since: int | None = None
        self._last_alarm = -1
        self._episodes = 0
        self._firing: list[str] = []

    # ------------------------------------------------------------------ calibration
    def calibrate(self, ref: ReferenceView, thresholds: dict | None = None) -> "Monitor":
        """Calibrate every detector the reference can feed; drop (and name) the others.

        `thresholds` ({"key", "thresholds": {detector: value}}, from `calibration()` of a monitor
        with the same settings on the same reference view) skips the simulations when its key
        matches: a worker starts in milliseconds instead of seconds.
        """
        key = self.key(ref)
        given = thresholds["thresholds"] if thresholds and thresholds.get("key") == key else {}
        source = "given thresholds" if given else "simulation"
        recalled = None if given else _recall(key)
        if recalled is not None:
            given, source = recalled, "simulation (earlier in this process)" if key in _CALIBRATED \
                else "simulation (earlier, in the calibration cache)"
        self._fit(ref, lambda name: given.get(name.value))
        self.calibrated_from = source
        self._key = key
        thresholds = {n.value: float(det.threshold) for n, det in self.detectors.items()}
        if thresholds != recalled:
            _remember(key, thresholds)
        return self

    def fit_reference(self, ref: ReferenceView) -> "Monitor":
        """Fit the detectors' reference statistics only, with no thresholds (no simulation): a
        monitor that never watches a stream, kept to `fit_rebase` versions for workers whose
        monitors calibrated on the same reference (a learner's). Its thresholds mean nothing."""
        self._fit(ref, lambda name: UNUSED_THRESHOLD)
        self.calibrated_from = "reference statistics only"
        return self

    def _fit(self, ref: ReferenceView, t: Callable[[DetectorName], float | None]) -> None:
        d, D = self.detectors, DetectorName
        if D.CONFIDENCE in d:
            d[D.CONFIDENCE].calibrate(normalized_entropy(ref.probs), threshold=t(D.CONFIDENCE))
        if D.CLASS_SHIFT in d:
            d[D.CLASS_SHIFT].calibrate(ref.probs.argmax(1), ref.probs.shape[1], threshold=t(D.CLASS_SHIFT))
        if D.OUTPUT_SHIFT in d:
            d[D.OUTPUT_SHIFT].calibrate(ref.values.double(), threshold=t(D.OUTPUT_SHIFT))
        if D.FEATURE_SHIFT in d:
            if ref.features is None:
                self._drop(D.FEATURE_SHIFT, "no features: the model has no output Linear to tap and no inputs were given")
            else:
                d[D.FEATURE_SHIFT].calibrate(ref.features, threshold=t(D.FEATURE_SHIFT))
        if D.ERROR_RATE in d:
            d[D.ERROR_RATE].calibrate(float(ref.errors.mean()) if ref.errors is not None else 0.0,
                                      threshold=t(D.ERROR_RATE))
        if D.RESIDUAL in d:
            if ref.errors is None:
                self._drop(D.RESIDUAL, "no reference targets: give labelled reference data to watch feedback errors")
            else:
                d[D.RESIDUAL].calibrate(ref.errors, threshold=t(D.RESIDUAL))

    def key(self, ref: ReferenceView) -> str:
        """What the thresholds depend on: settings, task, detectors and the reference view."""
        import hashlib
        import json
        from dataclasses import asdict

        h = hashlib.sha256(json.dumps([asdict(self.config), self.task.kind.value, self.task.outputs,
                                       sorted(n.value for n in self.detectors)]).encode())
        for name in ("probs", "features", "values", "errors"):
            v = getattr(ref, name)
            h.update(name.encode() + (b"-" if v is None else v.detach().cpu().double().contiguous().numpy().tobytes()))
        return h.hexdigest()

    def calibration(self) -> dict:
        """The thresholds and the key they hold for: give them to `calibrate` to skip simulating."""
        return {"key": self._key, "thresholds": {n.value: float(d.threshold) for n, d in self.detectors.items()}}

    def _drop(self, name: DetectorName, why: str) -> None:
        del self.detectors[name]
        self.missing[name.value] = why

    def project_features(self, features: torch.Tensor | None) -> torch.Tensor | None:
        """Features (n, D) on the feature chart's principal axes (n, k); None without that chart."""
        det = self.detectors.get(DetectorName.FEATURE_SHIFT)
        if features is None or det is None or not det.calibrated:
            return None
        return det.project(features)

    def fit_rebase(self, ref: ReferenceView) -> dict[str, dict[str, torch.Tensor]]:
        """After a labelled update: the reference statistics seen through the new weights,
        fitted on copies (the slow part: an eigendecomposition), as {detector: reference_state}.
        `install_rebase` puts them in (fast), here or in another process, so the update itself
        is not reported as drift. Thresholds stay: they depend only on sizes."""
        import copy

        d, D = self.detectors, DetectorName
        fitted: dict[DetectorName, Detector] = {}
        if D.CONFIDENCE in d and ref.probs is not None:
            fitted[D.CONFIDENCE] = copy.copy(d[D.CONFIDENCE]).rebase(normalized_entropy(ref.probs))
        if D.FEATURE_SHIFT in d and ref.features is not None and d[D.FEATURE_SHIFT].calibrated:
            fitted[D.FEATURE_SHIFT] = copy.copy(d[D.FEATURE_SHIFT]).rebase(ref.features)
        if D.OUTPUT_SHIFT in d and ref.values is not None and d[D.OUTPUT_SHIFT].calibrated:
            fitted[D.OUTPUT_SHIFT] = copy.copy(d[D.OUTPUT_SHIFT]).rebase(ref.values.double())
        return {name.value: det.reference_state() for name, det in fitted.items()}

    def install_rebase(self, values: dict[str, dict[str, torch.Tensor]]) -> None:
        """Install reference statistics fitted elsewhere (by a learner): {detector: reference_state}.
        Every detector's values are checked before any is installed."""
        known = {name.value: det for name, det in self.detectors.items()}
        targets = [(known[name], state) for name, state in values.items() if name in known]
        backup = [(det, det.reference_state()) for det, _ in targets]
        try:
            for det, state in targets:
                det.load_reference(state)
        except Exception:
            for det, state in backup:
                det.load_reference(state)
            raise

    # ------------------------------------------------------------------ observation
    def observe_predictions(self, probs: torch.Tensor | None = None, features: torch.Tensor | None = None,
                            values: torch.Tensor | None = None) -> list[str]:
        """Feed one batch of predictions: probabilities (B, C) or values (B, D), and features (B, F).
        Returns the detectors that alarmed, in the order of their first alarm within the batch."""
        d, D = self.detectors, DetectorName
        names: list[DetectorName] = []
        if probs is not None:
            n = probs.shape[0]
            for name, arg in ((D.CONFIDENCE, normalized_entropy(probs)), (D.CLASS_SHIFT, probs.argmax(1))):
                if name in d:
                    d[name].update(arg)
                    names.append(name)
        if values is not None:
            n = values.shape[0]
            if D.OUTPUT_SHIFT in d:
                d[D.OUTPUT_SHIFT].update(values.double())
                names.append(D.OUTPUT_SHIFT)
        if features is not None and D.FEATURE_SHIFT in d:
            n = features.shape[0]
            d[D.FEATURE_SHIFT].update(features)
            names.append(D.FEATURE_SHIFT)
        if not names:
            return []
        self._samples += n
        return self._after_update(names)

    def observe_errors(self, errors: torch.Tensor) -> list[str]:
        """Feed per-label errors (B,): 0/1 mistakes (classifiers) or squared errors (regression)."""
        names = [n for n in ON_FEEDBACK if n in self.detectors]
        for name in names:
            self.detectors[name].update(errors.to(torch.float64))
        if not names:
            return []
        self._samples += errors.shape[0]
        return self._after_update(names)

    def _after_update(self, names: list[DetectorName]) -> list[str]:
        # In order of each detector's first alarm within the batch (ties: in `names` order), so a
        # batch tells what a sample-by-sample stream would have told first.
        fired = [n.value for n in sorted((n for n in names if self.detectors[n].drift_detected),
                                         key=lambda n: self.detectors[n].first_alarm)]
        if fired:
            if self._since is None:
                self._since, self._episodes = self._samples, self._episodes + 1
            self._firing += [n for n in fired if n not in self._firing]
            self._last_alarm = self._samples
        elif self._since is not None and self._samples - self._last_alarm >= self.config.settle_samples:
            self._since, self._firing = None, []  # settled: end of the episode
        return fired

    # ------------------------------------------------------------------ state
    @property
    def drift_detected(self) -> bool:
        return self._since is not None

    @property
    def state(self) -> DriftState:
        return DriftState(detected=self.drift_detected, firing=list(self._firing),
                          scores={name.value: round(det.score, 4) for name, det in self.detectors.items()},
                          since=self._since, episodes=self._episodes)

    def reset(self) -> None:
        """Forget running statistics and episodes; keep calibration."""
        for det in self.detectors.values():
            det.reset()
        self._reset()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["detectors"] = {name.value: det.state_dict() for name, det in self.detectors.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        dets = state.pop("detectors", None)
        mine = {n.value for n in self.detectors}
        if not isinstance(dets, dict) or set(dets) != mine:
            raise ValueError(f"Monitor state needs detector states for {sorted(mine)}")
        backup = self.state_dict()
        try:
            super().load_state_dict(state)
            for name, det in self.detectors.items():
                det.load_state_dict(dets[name.value])
        except Exception:
            super().load_state_dict({k: v for k, v in backup.items() if k != "detectors"})
            for name, det in self.detectors.items():
                det.load_state_dict(backup["detectors"][name.value])
            raise
