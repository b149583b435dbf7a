"""Confidence detector: a rise in predictive entropy beyond what the reference shows."""
from __future__ import annotations

import math

import torch

from selfheal_core.monitor.base import RankCusumDetector


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of probs (B, C), divided by log C: values in [0, 1]."""
    p = probs.clamp_min(1e-12)
    return -(p * p.log()).sum(dim=1) / math.log(probs.shape[1])  # (B,)


class ConfidenceDetector(RankCusumDetector):
    """CUSUM on the rank of each prediction's entropy among reference entropies.

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

    def calibrate(self, reference_entropy, what: str = "entropies", threshold: float | None = None) -> "ConfidenceDetector":
        return super().calibrate(reference_entropy, what, threshold)
