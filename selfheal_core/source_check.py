"""Source check: labels judge the learned weights against the source weights, as each arrives.

The guard judges one update on a small holdout that spans several domains of a
continual stream; an update can pass it and still leave weights that serve the
current domain worse than the source weights would, under the same adapted
statistics (what label-free correction alone serves). Fashion-MNIST-C with 5%
labels: weights learned on earlier corruptions cost 10 points on a later one
against label-free correction alone.

Each new label, before anything learns from it, is a fair test of both: its
loss under the learned weights and under the source weights, read through the
same input transform and statistics (prequential, so no holdout is spent).
When the learned weights' loss exceeds the source's over the last `window`
labels by more than `significance` standard errors of the paired difference,
the learned weights go back to the source ones and learning starts again from
the newest labels (`Learner` carries that out). Owned by the learner's loop.
"""
from __future__ import annotations

from collections import deque

import torch

from selfheal_core.state import DequeState, StateMixin


class SourceCheck(StateMixin):
    """Paired per-label losses (learned minus source) over a sliding window of labels."""

    _state_keys = ("_diffs_state", "fallbacks")
    _diffs_state = DequeState("_diffs", torch.float64)

    def __init__(self, window: int, significance: float, min_labels: int) -> None:
        self.window = window
        self.significance = significance
        self.min_labels = min_labels
        self.reset()

    def reset(self) -> None:
        self._diffs: deque[float] = deque(maxlen=self.window)
        self.fallbacks = 0

    def observe(self, learned_loss: torch.Tensor, source_loss: torch.Tensor) -> bool:
        """Add the labels' paired losses; True when the learned weights are worse (then the window
        restarts: the next verdict is about the weights that follow)."""
        self._diffs.extend((learned_loss.double() - source_loss.double()).tolist())
        if not self.worse():
            return False
        self._diffs.clear()
        self.fallbacks += 1
        return True

    def worse(self) -> bool:
        n = len(self._diffs)
        if n < self.min_labels:
            return False
        d = torch.tensor(list(self._diffs), dtype=torch.float64)
        mean = float(d.mean())
        return mean > 0 and mean > self.significance * float(d.std()) / n ** 0.5

    def status(self) -> dict:
        d = list(self._diffs)
        return {"labels": len(d), "learned_minus_source_loss": sum(d) / len(d) if d else None,
                "fallbacks": self.fallbacks}
