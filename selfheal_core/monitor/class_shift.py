"""Predicted-class shift detector: label shift seen through the model's predictions.

Black-box shift detection (Lipton et al. 2018): if the class priors move, the
distribution of predicted classes moves with them, whatever the model's errors.
The chart is a multivariate EWMA of one-hot predicted classes, whitened by the
multinomial covariance of the reference's predicted-class frequencies.
"""
from __future__ import annotations

import numpy as np
import torch

from selfheal_core.monitor.base import REPLICAS, MewmaDetector, as_array


class ClassShiftDetector(MewmaDetector):
    """MEWMA on one-hot predicted classes against the reference class frequencies.

    >>> rng = np.random.default_rng(0)
    >>> det = ClassShiftDetector(expected_run_time=10_000).calibrate(rng.integers(0, 4, 400), num_classes=4)
    >>> _ = det.update(rng.integers(0, 4, 1000))
    >>> det.alarms
    0
    >>> for i in range(200):
    ...     if det.update(rng.choice(4, size=1, p=[0.7, 0.1, 0.1, 0.1])).drift_detected:
    ...         print(f"drift detected after {i + 1} shifted samples")
    ...         break
    drift detected after 34 shifted samples
    """

    _state_keys = MewmaDetector._state_keys + ("_freq", "_proj")

    def __init__(self, expected_run_time: int = 10_000, lam: float = 0.05, margin: float = 0.6,
                 paths: int = 200, seed: int = 0) -> None:
        self._freq = torch.zeros(0, dtype=torch.float64)  # (C,) reference predicted-class frequencies
        self._proj = torch.zeros(0, 0, dtype=torch.float64)  # (C, C-1) whitening
        super().__init__(expected_run_time, lam, margin, paths, seed)

    @staticmethod
    def _fit(cls: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """Add-one smoothed frequencies (C,) and the whitening (C, C-1) of their multinomial covariance."""
        counts = np.bincount(cls, minlength=num_classes) + 1.0
        freq = counts / counts.sum()
        evals, evecs = np.linalg.eigh(np.diag(freq) - np.outer(freq, freq))
        keep = np.argsort(evals)[1:]  # drop the all-ones direction, which has zero variance
        return freq, evecs[:, keep] / np.sqrt(evals[keep])

    def calibrate(self, reference_classes, num_classes: int, threshold: float | None = None) -> "ClassShiftDetector":
        """Fit frequencies on reference predicted classes (R,) and set the threshold.

        Bootstrap calibration: each group of simulated paths refits the
        frequencies on a resample of the reference classes and streams from the
        whole reference, so estimation error is part of the false-alarm rate.
        Resamples hold `margin` times fewer classes than the reference, to allow
        for benign differences of live traffic (see FeatureShiftDetector).
        """
        cls = as_array(reference_classes, "ClassShiftDetector.calibrate", 1).astype(np.int64)
        if num_classes < 2 or len(cls) < 20 or cls.min() < 0 or cls.max() >= num_classes:
            raise ValueError(f"need >= 20 reference classes in [0, {num_classes}) and num_classes >= 2")
        freq, proj = self._fit(cls, num_classes)
        self._freq, self._proj = torch.from_numpy(freq), torch.from_numpy(proj)
        if threshold is not None:
            self._calibrate(None, proj.shape[1], self.expected_run_time, self.paths, self.seed, threshold=threshold)
            return self
        n, boot, eye = len(cls), np.random.default_rng(self.seed + 1), np.eye(num_classes)
        groups = max(self.paths // REPLICAS, 1)
        size = max(int(n * self.margin), 1)
        white = np.stack([(eye[cls] - f) @ p for f, p in (self._fit(cls[boot.integers(0, n, size)], num_classes)
                                                           for _ in range(groups))])  # (groups, R, C-1)
        white = np.repeat(white, REPLICAS, axis=0).astype(np.float32)  # (groups * REPLICAS, R, C-1)
        rows = np.arange(len(white))

        def draw(rng: np.random.Generator, paths: int, steps: int) -> np.ndarray:
            return white[rows[:paths, None], rng.integers(0, n, size=(paths, steps))]

        self._calibrate(draw, proj.shape[1], self.expected_run_time, len(white), self.seed, groups)
        return self

    def _whiten(self, values) -> np.ndarray:
        cls = as_array(values, type(self).__name__, 1)
        c = len(self._freq)
        if (cls != np.round(cls)).any() or cls.min(initial=0) < 0 or cls.max(initial=0) >= c:
            raise ValueError(f"{type(self).__name__}: classes must be integers in [0, {c - 1}]")
        return (np.eye(c)[cls.astype(np.int64)] - self._freq.numpy()) @ self._proj.numpy()
