"""Residual detector: regression errors on feedback grow beyond what the reference shows.

The regression counterpart of the error-rate detector: each labelled target
gives a squared error, ranked among the squared errors of the model on its
labelled reference; a CUSUM on the ranks' normal scores alarms when errors
grow (concept drift, or inputs the model no longer handles). Fed whenever
labels arrive, so delay and sparsity slow it down but do not bias it.
"""
from __future__ import annotations

from selfheal_core.monitor.base import RankCusumDetector


class ResidualDetector(RankCusumDetector):
    """Rank CUSUM on squared errors of labelled predictions against reference squared errors.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> det = ResidualDetector(expected_run_time=10_000).calibrate(torch.randn(300, generator=g) ** 2)
    >>> _ = det.update(torch.randn(1000, generator=g) ** 2)
    >>> det.alarms
    0
    >>> for i in range(200):
    ...     if det.update((2 * torch.randn(1, generator=g)) ** 2).drift_detected:
    ...         print(f"drift detected after {i + 1} labels")
    ...         break
    drift detected after 19 labels
    """

    def calibrate(self, reference_errors, what: str = "squared errors (the labelled reference)",
                  threshold: float | None = None) -> "ResidualDetector":
        return super().calibrate(reference_errors, what, threshold)
