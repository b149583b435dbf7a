"""Shared machinery of the online detectors: a one-sided CUSUM whose threshold is
calibrated by simulation to a target expected run time (ERT) without drift.

Why CUSUM: O(1) state, per-sample cost of a few array operations, and the
optimal detector of a persistent mean increase. Why simulate the threshold: the
monitored statistics (entropy, error indicators) are far from Gaussian, so
closed-form ARL approximations miss the target; bootstrap paths from the
reference distribution hit it without assumptions.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from selfheal_core.state import StateMixin

Sampler = Callable[[np.random.Generator, tuple], np.ndarray]


def _finite_1d(values: torch.Tensor | np.ndarray | list, name: str) -> np.ndarray:
    """Validate and convert to a float64 vector; raise ValueError (state untouched) on bad input."""
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D batch of values, got shape {tuple(arr.shape)}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: values contain NaN or inf")
    return arr


def calibrate_threshold(sampler: Sampler, expected_run_time: int, paths: int, seed: int) -> float:
    """Threshold h so that a CUSUM over iid increments from `sampler` alarms after ~ERT steps.

    Runs `paths` zero-started CUSUM paths of length 2*ERT, and solves for h with the
    censored exponential estimate ERT(h) = total steps to alarm-or-end / alarms.
    """
    rng = np.random.default_rng(seed)
    length = 2 * expected_run_time
    z = sampler(rng, (paths, length)).astype(np.float32)
    c = np.cumsum(z, axis=1)
    s = c - np.minimum.accumulate(np.minimum(c, 0.0), axis=1)  # Lindley recursion, vectorised
    peak = np.maximum.accumulate(s, axis=1)  # (paths, length), non-decreasing per path
    del z, c, s

    def ert(h: float) -> float:
        tau = np.array([np.searchsorted(p, h, side="right") for p in peak])  # first index with peak > h
        alarms = int((tau < length).sum())
        return float(np.minimum(tau + 1, length).sum()) / max(alarms, 1) if alarms else math.inf

    lo, hi = 0.0, float(peak[:, -1].max()) + 1e-6
    for _ in range(40):  # bisection: ERT(h) grows with h
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ert(mid) < expected_run_time else (lo, mid)
    return hi


class CusumDetector(StateMixin):
    """One-sided CUSUM on per-sample increments, with a calibrated threshold.

    Subclasses turn raw values into increments (`_increments`) and calibrate
    `threshold` once; `update` then costs a few vectorised operations per batch.
    """

    _state_keys = ("threshold", "_s", "_n", "_alarms", "_drift", "_last_alarm")

    def __init__(self) -> None:
        self.threshold = math.inf
        self._reset()

    def _reset(self) -> None:
        self._s = 0.0  # current CUSUM statistic
        self._n = 0  # samples seen
        self._alarms = 0
        self._drift = False  # did the last update raise an alarm
        self._last_alarm = -1  # sample index of the last alarm

    def reset(self) -> None:
        """Forget running statistics; keep the calibration."""
        self._reset()

    @property
    def drift_detected(self) -> bool:
        return self._drift

    @property
    def score(self) -> float:
        """CUSUM statistic over threshold: >= 1 means an alarm."""
        return self._s / self.threshold if math.isfinite(self.threshold) else 0.0

    @property
    def n_samples(self) -> int:
        return self._n

    @property
    def alarms(self) -> int:
        return self._alarms

    @property
    def last_alarm(self) -> int:
        return self._last_alarm

    def _increments(self, values: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def update(self, values) -> "CusumDetector":
        """Feed a batch of per-sample values; restarts the CUSUM after each alarm."""
        z = self._increments(_finite_1d(values, type(self).__name__))
        self._drift = False
        start = 0
        while start < len(z):
            c = self._s + np.cumsum(z[start:])
            s = c - np.minimum(np.minimum.accumulate(c), 0.0)  # S_t = max(S_0 + C_t, C_t - min C_j, 0)
            hit = np.flatnonzero(s > self.threshold)
            if not len(hit):
                self._s = float(s[-1])
                break
            self._drift = True
            self._alarms += 1
            self._last_alarm = self._n + start + int(hit[0])
            self._s = 0.0
            start += int(hit[0]) + 1
        self._n += len(z)
        return self
