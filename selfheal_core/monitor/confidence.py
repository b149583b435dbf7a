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
    """CUSUM on the rank of each prediction's entropy among reference entropies.

    Each value v is scored z = Phi^-1(u), u its mid-rank among the R reference
    entropies in (0, 1). Without drift a new value's rank is uniform over the
    R + 1 gaps, so z is known exactly, bounded (|z| < 3 for R = 300) and the
    threshold calibration is distribution-free. Raw standardised entropy is
    heavy-tailed: a few confusing clean inputs would trip the CUSUM.

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
    drift detected after 3 shifted samples
    """

    _state_keys = CusumDetector._state_keys + ("_ref",)

    def __init__(self, expected_run_time: int = 10_000, slack: float = 0.5, paths: int = 200, seed: int = 0) -> None:
        if slack <= 0:
            raise ValueError(f"slack must be > 0, got {slack}")
        self.slack = slack
        self._ref = torch.zeros(0, dtype=torch.float64)  # sorted reference entropies
        super().__init__(expected_run_time, paths, seed)

    def calibrate(self, reference_entropy) -> "ConfidenceDetector":
        """Keep the sorted reference entropies and set the threshold for the null rank distribution."""
        ref = torch.as_tensor(reference_entropy).detach().to("cpu", torch.float64).flatten()
        if len(ref) < 20 or not torch.isfinite(ref).all():
            raise ValueError("calibration needs at least 20 finite reference values")
        self._ref = ref.sort().values
        n = len(ref)
        z_null = self._scores(np.arange(n + 1) + 0.5, n)  # a new value falls in each gap equally often
        self.threshold = calibrate_threshold(
            lambda rng, shape: rng.choice(z_null, size=shape) - self.slack, self.expected_run_time, self.paths,
            self.seed,
        )
        self._reset()
        return self

    def rebase(self, reference_entropy) -> "ConfidenceDetector":
        """New reference entropies (the same inputs through updated weights); the threshold is
        distribution-free and stays, and so does the running CUSUM."""
        ref = torch.as_tensor(reference_entropy).detach().to("cpu", torch.float64).flatten()
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
