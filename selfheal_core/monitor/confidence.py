"""Confidence detector: a rise in predictive entropy beyond what the reference shows."""
from __future__ import annotations

import math

import numpy as np
import torch

from selfheal_core.monitor.base import CusumDetector, calibrate_threshold


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of probs (B, C), divided by log C: values in [0, 1]."""
    p = probs.clamp_min(1e-12)
    return -(p * p.log()).sum(dim=1) / math.log(probs.shape[1])  # (B,)


class ConfidenceDetector(CusumDetector):
    """CUSUM on standardised normalised entropy, calibrated on reference entropies.

    >>> import torch
    >>> g = torch.Generator().manual_seed(3)
    >>> det = ConfidenceDetector(expected_run_time=10_000).calibrate(torch.rand(300, generator=g) * 0.2)
    >>> _ = det.update(torch.rand(1000, generator=g) * 0.2)
    >>> det.alarms
    0
    >>> for i in range(100):
    ...     if det.update(0.3 + torch.rand(1, generator=g) * 0.2).drift_detected:
    ...         print(f"drift detected after {i + 1} shifted samples")
    ...         break
    drift detected after 2 shifted samples
    """

    _state_keys = CusumDetector._state_keys + ("_mean", "_std")

    def __init__(self, expected_run_time: int = 10_000, slack: float = 0.5, paths: int = 200, seed: int = 0) -> None:
        if expected_run_time < 10:
            raise ValueError(f"expected_run_time must be >= 10, got {expected_run_time}")
        if slack <= 0:
            raise ValueError(f"slack must be > 0, got {slack}")
        self.expected_run_time = expected_run_time
        self.slack = slack
        self.paths = paths
        self.seed = seed
        self._mean, self._std = 0.0, 1.0
        super().__init__()

    def calibrate(self, reference_entropy) -> "ConfidenceDetector":
        """Set the standardisation and the threshold from reference per-sample entropies."""
        ref = np.asarray(torch.as_tensor(reference_entropy, dtype=torch.float64).flatten())
        if len(ref) < 20 or not np.isfinite(ref).all():
            raise ValueError("calibration needs at least 20 finite reference values")
        self._mean, self._std = float(ref.mean()), max(float(ref.std()), 1e-3)
        z_ref = self._increments(ref)
        self.threshold = calibrate_threshold(
            lambda rng, shape: rng.choice(z_ref, size=shape), self.expected_run_time, self.paths, self.seed
        )
        self._reset()
        return self

    def _increments(self, values: np.ndarray) -> np.ndarray:
        return (values - self._mean) / self._std - self.slack
