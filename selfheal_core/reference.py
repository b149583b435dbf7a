"""Checks of a reference sample: the data the monitor's false-alarm rate is calibrated on.

The reference must be held-out in-distribution data. A sample the model was
fitted on looks far more confident than live traffic ever will, so a clean
stream reads as drift almost all the time (measured: 98-99.8% of 20,000 clean
digits flagged with a training-data reference). With labels that shows:
modern networks err and are over-confident on data they did not see, and
err on nothing, with near-zero loss, on data they memorised. `check_reference`
flags that (and a sample too small to calibrate on); the live check in
`first_traffic_warning` flags the other symptom once traffic arrives.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from selfheal_core.task import Task

FITTED_NLL = 0.01  # mean loss below this with no error at all: memorised, not held out
SMALL_REFERENCE = 100


@dataclass(frozen=True)
class ReferenceReport:
    size: int
    labelled: bool
    error: float | None = None  # error rate (classifiers) or MSE (regression) against the labels
    loss: float | None = None  # mean loss against the labels
    mean_confidence: float | None = None  # classifiers: mean top-class probability
    looks_fitted: bool = False
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        return {**asdict(self), "warnings": list(self.warnings)}


def check_reference(task: Task, raw: torch.Tensor, targets: torch.Tensor | None) -> ReferenceReport:
    """Inspect the model's outputs on its reference (and the reference labels, if any)."""
    warnings = []
    n = len(raw)
    if n < SMALL_REFERENCE:
        warnings.append(f"small reference ({n} inputs): false-alarm rates are calibrated on few samples; "
                        f"give a few hundred held-out inputs")
    conf = float(task.probs(raw).max(1).values.mean()) if task.is_classifier else None
    error = loss = None
    fitted = False
    if targets is not None:
        with torch.no_grad():
            loss = float(task.loss(raw.float(), targets))
            error = float(task.errors(raw, targets).mean())
        if task.is_classifier and error == 0.0 and loss < FITTED_NLL and n >= SMALL_REFERENCE:
            fitted = True
            warnings.append(f"the reference looks like training data: no error on {n} labelled inputs and a mean "
                            f"loss of {loss:.4f}; held-out data is needed, or clean traffic will read as drift")
    return ReferenceReport(size=n, labelled=targets is not None, error=error, loss=loss, mean_confidence=conf,
                           looks_fitted=fitted, warnings=tuple(warnings))
