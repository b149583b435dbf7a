"""Error-rate detector: a Bernoulli CUSUM on feedback errors (concept drift via labels).

Labels arrive late and for few requests; the detector is fed whenever they
arrive, one error indicator per label, so delay and sparsity only slow it down,
never bias it.
"""
from __future__ import annotations

import math

import numpy as np

from selfheal_core.monitor.base import CusumDetector, calibrate_threshold


class ErrorRateDetector(CusumDetector):
    """Tests error rate p0 (in control) against p0 + shift, log-likelihood-ratio CUSUM.

    >>> det = ErrorRateDetector(expected_run_time=10_000).calibrate(0.05)
    >>> rng = np.random.default_rng(0)
    >>> _ = det.update(rng.random(1000) < 0.05)
    >>> det.alarms
    0
    >>> for i in range(1000):
    ...     if det.update(rng.random(1) < 0.30).drift_detected:
    ...         print(f"drift detected after {i + 1} labels")
    ...         break
    drift detected after 11 labels
    """

    _state_keys = CusumDetector._state_keys + ("_p0", "_p1")

    def __init__(self, expected_run_time: int = 10_000, shift: float = 0.10, floor: float = 0.02,
                 paths: int = 200, seed: int = 0) -> None:
        if not 0 < shift < 1 or not 0 <= floor < 1:
            raise ValueError(f"need 0 < shift < 1 and 0 <= floor < 1, got shift={shift}, floor={floor}")
        self.shift = shift
        self.floor = floor
        self._p0, self._p1 = floor, min(floor + shift, 0.99)
        super().__init__(expected_run_time, paths, seed)

    def calibrate(self, baseline_error: float, threshold: float | None = None) -> "ErrorRateDetector":
        """Set the in-control error rate (floored) and the threshold for it."""
        if not 0 <= baseline_error <= 1:
            raise ValueError(f"baseline_error must be in [0, 1], got {baseline_error}")
        self._p0 = min(max(baseline_error, self.floor), 0.9)
        self._p1 = min(self._p0 + self.shift, 0.99)
        p0 = self._p0
        self.threshold = threshold if threshold is not None else calibrate_threshold(
            lambda rng, shape: self._increments((rng.random(shape) < p0).astype(np.float64)),
            self.expected_run_time, self.paths, self.seed,
        )
        self._reset()
        return self

    @property
    def baseline_error(self) -> float:
        return self._p0

    def _increments(self, errors: np.ndarray) -> np.ndarray:
        if not np.isin(errors, (0.0, 1.0)).all():
            raise ValueError("ErrorRateDetector: values must be 0 (correct) or 1 (error)")
        up, down = math.log(self._p1 / self._p0), math.log((1 - self._p1) / (1 - self._p0))
        return np.where(errors > 0.5, up, down)
