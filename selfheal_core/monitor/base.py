"""Shared machinery of the online detectors.

One protocol for all: `update(values) -> self`, `drift_detected` (did the last
update alarm), a continuous `score` (statistic over threshold, >= 1 at an
alarm), `reset()`, `state_dict()` / `load_state_dict()`.

Three charts, each O(1) state and a few vectorised operations per batch:
- `CusumDetector`: one-sided CUSUM on scalar per-sample increments, the
  optimal detector of a persistent mean increase;
- `RankCusumDetector`: a CUSUM on the normal scores of each value's rank
  among reference values (distribution-free: the null is known exactly);
- `MewmaDetector`: multivariate EWMA (Lowry et al. 1992) on whitened vectors,
  sensitive to small persistent mean shifts in any direction.

Thresholds are set by simulation to a target expected run time (ERT) without
drift: the statistics monitored (entropy ranks, whitened features, class
indicators, error indicators) are far from Gaussian, so closed-form run-length
approximations miss the target; simulated paths from the null hit it.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from selfheal_core.state import StateMixin

Sampler = Callable[[np.random.Generator, tuple], np.ndarray]
_CHUNK = 64  # MEWMA batches are processed in chunks: O(chunk^2) work, bounded
REPLICAS = 10  # simulated paths per draw of the reference's estimation error


def as_array(values, name: str, ndim: int) -> np.ndarray:
    """Validate and convert to float64 with `ndim` dims; ValueError (state untouched) on bad input."""
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected a batch of {'values' if ndim == 1 else 'vectors'} "
                         f"({ndim}-D), got shape {tuple(arr.shape)}")
    try:
        arr = arr.astype(np.float64, copy=False)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: values must be numeric") from None
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: values contain NaN or inf")
    return arr


def ert_threshold(peak: np.ndarray, expected_run_time: int, groups: int = 1) -> float:
    """Threshold h on simulated running maxima `peak` (paths, L) with ERT(h) = target.

    Paths come in `groups` of equal size that share their simulated stream
    parameters (one draw of the reference sample's estimation error). Within a
    group the alarm rate is the censored exponential estimate, alarms over steps
    until alarm or the path's end; ERT(h) is one over the median rate of the
    groups: the chart then meets its target for a typical reference sample. (The
    mean rate is dominated by rare, badly estimated references and would make
    every typical deployment far quieter than configured.)
    """
    length = peak.shape[1]

    def ert(h: float) -> float:
        tau = np.array([np.searchsorted(p, h, side="right") for p in peak])  # first index with peak > h
        alarms = (tau < length).reshape(groups, -1).sum(1)
        exposure = np.minimum(tau + 1, length).reshape(groups, -1).sum(1)
        rate = float(np.median(alarms / exposure)) if groups > 1 else float(alarms.sum() / exposure.sum())
        return 1.0 / rate if rate > 0 else math.inf

    lo, hi = 0.0, float(peak[:, -1].max()) + 1e-6
    for _ in range(40):  # bisection: ERT(h) grows with h
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ert(mid) < expected_run_time else (lo, mid)
    return hi


def calibrate_threshold(sampler: Sampler, expected_run_time: int, paths: int, seed: int) -> float:
    """CUSUM threshold for iid increments drawn by `sampler`, from `paths` zero-started paths of 2*ERT."""
    rng = np.random.default_rng(seed)
    z = sampler(rng, (paths, 2 * expected_run_time)).astype(np.float32)
    c = np.cumsum(z, axis=1)
    s = c - np.minimum.accumulate(np.minimum(c, 0.0), axis=1)  # Lindley recursion, vectorised
    return ert_threshold(np.maximum.accumulate(s, axis=1), expected_run_time)


class Detector(StateMixin):
    """Settings and alarm bookkeeping shared by every detector."""

    _state_keys = ("threshold", "_n", "_alarms", "_drift", "_last_alarm")
    _reference_keys: tuple[str, ...] = ()  # what `rebase` changes: handed between processes after an update

    def __init__(self, expected_run_time: int, paths: int, seed: int) -> None:
        if expected_run_time < 10:
            raise ValueError(f"expected_run_time must be >= 10, got {expected_run_time}")
        if paths < REPLICAS:
            raise ValueError(f"paths must be >= {REPLICAS}, got {paths}")
        self.expected_run_time = expected_run_time  # clean samples between false alarms
        self.paths = paths  # simulated streams for calibration
        self.seed = seed  # calibration is seeded: a restart gets the same threshold
        self.threshold = math.inf
        self._reset()

    def _reset(self) -> None:
        self._n = 0  # samples seen
        self._alarms = 0
        self._drift = False  # did the last update raise an alarm
        self.first_alarm = 0  # index within the last update of its first alarm (valid while _drift)
        self._last_alarm = -1  # sample index of the last alarm

    def reset(self) -> None:
        """Forget running statistics; keep the calibration."""
        self._reset()

    def reference_state(self) -> dict[str, torch.Tensor]:
        """The reference statistics `rebase` sets (copies), for `load_reference` elsewhere."""
        return {key: getattr(self, key).clone() for key in self._reference_keys}

    def load_reference(self, values: dict[str, torch.Tensor]) -> None:
        """Take reference statistics from `reference_state()` of a detector built alike (another
        process rebased it): the keys and shapes must match; on a mismatch nothing changes."""
        if set(values) != set(self._reference_keys):
            raise ValueError(f"{type(self).__name__} reference needs {sorted(self._reference_keys)}, "
                             f"got {sorted(values)}")
        for key in self._reference_keys:
            mine, theirs = getattr(self, key), values[key]
            if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape:
                raise ValueError(f"{type(self).__name__}.{key}: expected shape {tuple(mine.shape)}, got "
                                 f"{tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__}")
        for key in self._reference_keys:
            setattr(self, key, values[key].detach().to("cpu", getattr(self, key).dtype).clone())

    @property
    def drift_detected(self) -> bool:
        return self._drift

    @property
    def alarms(self) -> int:
        return self._alarms

    @property
    def last_alarm(self) -> int:
        return self._last_alarm

    @property
    def n_samples(self) -> int:
        return self._n

    @property
    def calibrated(self) -> bool:
        return math.isfinite(self.threshold)

    def _alarm_at(self, index: int) -> None:
        if not self._drift:  # the first alarm of this update: its position orders detectors' alarms
            self.first_alarm = index
        self._drift = True
        self._alarms += 1
        self._last_alarm = self._n + index


class CusumDetector(Detector):
    """One-sided CUSUM on per-sample increments (`_increments`), restarted after each alarm."""

    _state_keys = Detector._state_keys + ("_s",)

    def _reset(self) -> None:
        super()._reset()
        self._s = 0.0  # current CUSUM statistic

    @property
    def score(self) -> float:
        return self._s / self.threshold if self.calibrated else 0.0

    def _increments(self, values: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def update(self, values) -> "CusumDetector":
        """Feed a batch of per-sample values (B,)."""
        z = self._increments(as_array(values, type(self).__name__, 1))
        self._drift = False
        start = 0
        while start < len(z):
            c = self._s + np.cumsum(z[start:])
            s = c - np.minimum(np.minimum.accumulate(c), 0.0)  # S_t = max(S_0 + C_t, C_t - min C_j, 0)
            hit = np.flatnonzero(s > self.threshold)
            if not len(hit):
                self._s = float(s[-1])
                break
            self._alarm_at(start + int(hit[0]))
            self._s = 0.0
            start += int(hit[0]) + 1
        self._n += len(z)
        return self


class RankCusumDetector(CusumDetector):
    """CUSUM on z = Phi^-1(u) - slack, u a value's mid-rank among the R reference values in (0, 1).

    Without drift a new value's rank is uniform over the R + 1 gaps, so z is known exactly,
    bounded (|z| < 3 for R = 300) and the threshold calibration is distribution-free: raw
    standardised values (entropies, squared errors) are heavy-tailed, and a few unusual
    clean inputs would trip a CUSUM on them. Alarms on a rise of the values.
    """

    _state_keys = CusumDetector._state_keys + ("_ref",)
    _reference_keys = ("_ref",)
    min_reference = 20

    def __init__(self, expected_run_time: int = 10_000, slack: float = 0.5, paths: int = 200, seed: int = 0) -> None:
        if slack <= 0:
            raise ValueError(f"slack must be > 0, got {slack}")
        self.slack = slack
        self._ref = torch.zeros(0, dtype=torch.float64)  # sorted reference values
        super().__init__(expected_run_time, paths, seed)

    def _reference(self, values, what: str) -> torch.Tensor:
        ref = torch.as_tensor(values).detach().to("cpu", torch.float64).flatten()
        if len(ref) < self.min_reference:
            raise ValueError(f"{type(self).__name__} needs at least {self.min_reference} reference {what}, "
                             f"got {len(ref)}")
        if not torch.isfinite(ref).all():
            raise ValueError(f"{type(self).__name__}: reference {what} contain NaN or inf")
        return ref.sort().values

    def calibrate(self, reference_values, what: str = "values", threshold: float | None = None) -> "RankCusumDetector":
        """Keep the sorted reference values and set the threshold for the null rank distribution
        (or take `threshold`, one computed before for the same reference and settings)."""
        self._ref = self._reference(reference_values, what)
        n = len(self._ref)
        z_null = self._scores(np.arange(n + 1) + 0.5, n)  # a new value falls in each gap equally often
        self.threshold = threshold if threshold is not None else calibrate_threshold(
            lambda rng, shape: rng.choice(z_null, size=shape) - self.slack, self.expected_run_time, self.paths,
            self.seed,
        )
        self._reset()
        return self

    def rebase(self, reference_values) -> "RankCusumDetector":
        """New reference values (the same inputs through updated weights); the threshold is
        distribution-free and stays, and so does the running CUSUM."""
        ref = torch.as_tensor(reference_values).detach().to("cpu", torch.float64).flatten()
        if len(ref) != len(self._ref) or not torch.isfinite(ref).all():
            raise ValueError(f"rebase needs {len(self._ref)} finite reference values")
        self._ref = ref.sort().values
        return self

    @staticmethod
    def _scores(position: np.ndarray, n: int) -> np.ndarray:
        return torch.special.ndtri(torch.as_tensor(position / (n + 1), dtype=torch.float64)).numpy()

    def _increments(self, values: np.ndarray) -> np.ndarray:
        ref = self._ref.numpy()
        mid = (np.searchsorted(ref, values, "left") + np.searchsorted(ref, values, "right")) / 2 + 0.5
        return self._scores(mid, len(ref)) - self.slack


class MewmaDetector(Detector):
    """Multivariate EWMA on whitened vectors w (mean 0, identity covariance without drift).

    z_t = (1 - lam) z_{t-1} + lam w_t and T2_t = |z_t|^2 (2 - lam) / lam; alarm when
    T2 exceeds the calibrated threshold, then z restarts at 0.
    """

    _state_keys = Detector._state_keys + ("_z", "_stat")

    def __init__(self, expected_run_time: int, lam: float, margin: float, paths: int, seed: int) -> None:
        if not 0 < lam <= 1:
            raise ValueError(f"lam must be in (0, 1], got {lam}")
        if not 0 < margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {margin}")
        self.lam = lam  # weight of the newest sample
        self.margin = margin  # calibrate as if the reference were this fraction of its size
        self._dim = 0
        self._decay: tuple[np.ndarray, np.ndarray] | None = None  # (lam a^(t-i) for i <= t, a^(t+1))
        super().__init__(expected_run_time, paths, seed)

    def _t2(self, z: np.ndarray) -> np.ndarray:
        """Statistic for EWMA states z (..., k)."""
        return (2.0 - self.lam) / self.lam * np.einsum("...d,...d->...", z, z)

    def _reset(self) -> None:
        super()._reset()
        self._z = torch.zeros(self._dim, dtype=torch.float64)  # EWMA of whitened vectors
        self._stat = 0.0  # statistic after the last sample

    @property
    def score(self) -> float:
        return self._stat / self.threshold if self.calibrated else 0.0

    def _whiten(self, values: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _calibrate(self, draw: Callable[[np.random.Generator, int, int], np.ndarray], dim: int,
                   expected_run_time: int, paths: int, seed: int, groups: int = 1,
                   threshold: float | None = None) -> None:
        """Threshold from `paths` simulated streams; `draw(rng, paths, steps)` gives whitened
        vectors (paths, steps, dim). Consecutive blocks of paths/groups paths share stream
        parameters (see `ert_threshold`). Time runs in blocks of _CHUNK steps, each a
        batched matrix product, so 2*ERT steps cost a fraction of a second.
        """
        self._dim = dim
        if threshold is not None:  # computed before for the same reference and settings
            self.threshold = threshold
            self._reset()
            return
        rng = np.random.default_rng(seed)
        length, a = 2 * expected_run_time, 1.0 - self.lam
        steps = np.arange(_CHUNK)
        decay = (self.lam * np.tril(a ** (steps[:, None] - steps[None, :]))).astype(np.float32)
        carry = (a ** (steps + 1)).astype(np.float32)[None, :, None]  # weight of the previous state
        z = np.zeros((paths, 1, dim), dtype=np.float32)
        peak = np.empty((paths, length), dtype=np.float32)
        running = np.zeros((paths, 1), dtype=np.float32)
        for start in range(0, length, _CHUNK):
            n = min(_CHUNK, length - start)
            path = carry[:, :n] * z + np.matmul(decay[:n, :n], draw(rng, paths, n).astype(np.float32))
            running = np.maximum.accumulate(np.concatenate([running, self._t2(path)], axis=1), axis=1)
            peak[:, start:start + n] = running[:, 1:]
            running, z = running[:, -1:], path[:, -1:]
        self.threshold = ert_threshold(peak, expected_run_time, groups)
        self._reset()

    def update(self, values) -> "MewmaDetector":
        """Feed a batch of vectors (B, D)."""
        w = self._whiten(values)  # (B, k); validates first
        self._drift = False
        z = self._z.numpy()
        if self._decay is None:  # lower-triangular Toeplitz: every chunk uses its top-left corner
            steps, a = np.arange(_CHUNK), 1.0 - self.lam
            self._decay = (self.lam * np.tril(a ** (steps[:, None] - steps[None, :])), a ** (steps + 1)[:, None])
        decay, carry = self._decay
        start = 0
        while start < len(w):
            chunk = w[start:start + _CHUNK]
            n = len(chunk)
            path = carry[:n] * z + decay[:n, :n] @ chunk  # (n, k): z_t for the chunk
            t2 = self._t2(path)
            hit = np.flatnonzero(t2 > self.threshold)
            if len(hit):
                self._alarm_at(start + int(hit[0]))
                z, self._stat = np.zeros_like(z), float(t2[hit[0]])
                start += int(hit[0]) + 1
                continue
            z, self._stat = path[-1], float(t2[-1])
            start += n
        self._z = torch.from_numpy(np.ascontiguousarray(z))
        self._n += len(w)
        return self
