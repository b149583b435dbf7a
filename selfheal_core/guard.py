"""Guard: an update is kept only if it does not raise the loss on held-back labels.

The judged quantity is the task's loss on the holdout (cross-entropy, or MSE
for regression), not its error: on a few dozen labels the error is coarse,
and a ratchet of updates that each leave it unchanged can still wreck the
model; the loss moves with every step.

Every `holdout_every`-th label is withheld from training and kept (bounded) as
a validation set of recent ground truth; labels pushed out of the holdout are
handed back for training, so no label is wasted. Large inputs are held compact
(`compact`: 20 224x224 images were 12 MB of the learner at float32).
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch
from torch import nn

from selfheal_core.config import GuardConfig
from selfheal_core.learn.compact import compact, keep, widen
from selfheal_core.model_parts import ActivationBudget
from selfheal_core.state import StateMixin
from selfheal_core.task import Task


class Guard(StateMixin):
    """Validates updates on held-back recent labels and counts decisions."""

    _state_keys = ("_holdout_state", "_count", "accepted", "rolled_back", "last_error")

    def __init__(self, config: GuardConfig, task: Task) -> None:
        self.config = config
        self.task = task
        self._reset()

    def _reset(self) -> None:
        self._holdout: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=self.config.holdout_size)
        self._dtype: torch.dtype | None = None  # the inputs' dtype as they came in: given back at it
        self._count = 0  # labels offered to the guard
        self.accepted = 0
        self.rolled_back = 0
        self.last_error: float | None = None

    def reset(self) -> None:
        self._reset()

    def drop(self, match: Callable[[torch.Tensor, torch.Tensor], bool]) -> int:
        """Remove held-back pairs (x, y) that `match` picks (labels taken back); returns how many."""
        before = len(self._holdout)
        kept = [item for item in self._holdout if not match(*item)]
        self._holdout.clear()
        self._holdout.extend(kept)
        return before - len(kept)

    def admit(self, x: torch.Tensor, y: torch.Tensor,
              skip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold back every k-th pair; return the pairs for training (incl. ones leaving the holdout).

        Pairs marked in `skip` (quarantined) are neither trained on nor held back, but they
        count, so the holdout stays every k-th label of the stream whatever the quarantine does.
        """
        train_x, train_y = [], []
        skip_list = skip.tolist() if skip is not None else [False] * len(y)
        if len(x):
            self._dtype = x.dtype
        for xi, yi, skipped in zip(x.detach().cpu(), y.detach().cpu(), skip_list):
            self._count += 1
            if skipped:
                continue
            if self._count % self.config.holdout_every == 0:
                if len(self._holdout) == self._holdout.maxlen:
                    train_x.append(self._input(0))  # the oldest held-back label goes to training
                    train_y.append(self._holdout[0][1])
                self._holdout.append((keep(xi), yi.clone()))
                continue
            train_x.append(xi)
            train_y.append(yi)
        if not train_x:
            return x[:0].cpu(), y[:0].cpu()
        return torch.stack(train_x), torch.stack(train_y)

    def _input(self, i: int) -> torch.Tensor:
        """The i-th held-back input at the dtype it came in."""
        x = self._holdout[i][0]
        return widen(x, self._dtype) if self._dtype is not None else x

    def _inputs(self) -> torch.Tensor:
        """The held-back inputs (B, ...) at the dtype they came in."""
        return torch.stack([self._input(i) for i in range(len(self._holdout))])

    @property
    def holdout_size(self) -> int:
        return len(self._holdout)

    @property
    def ready(self) -> bool:
        """Enough held-back labels to judge an update."""
        return len(self._holdout) >= self.config.min_holdout

    @torch.no_grad()
    @torch.no_grad()
    def evaluate(self, model: nn.Module, as_served: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 budget: ActivationBudget | None = None) -> tuple[float, float, torch.Tensor] | None:
        """(loss, error, per-sample losses) of `model` on the holdout, its inputs given to the model
        through `as_served` (serving's input transform now), in forwards within `budget`; None
        while it is empty. Without gradients: 20 224x224 images with them held 1.3 GB."""
        if not self._holdout:
            return None
        device = next(model.parameters()).device
        x = self._inputs().to(device)
        y = torch.stack([y for _, y in self._holdout]).to(device)
        x = as_served(x) if as_served is not None else x
        raw = torch.cat([model(xb) for xb in budget.batches(x)]) if budget is not None else model(x)
        per = self.task.loss(raw, y, reduction="none").detach().double().cpu()
        return float(per.mean()), float(self.task.errors(raw, y).mean()), per

    def judge(self, before: tuple | None, after: tuple | None) -> bool:
        """Accept unless the held-back loss rose beyond the tolerance plus `significance` standard
        errors of the paired per-label change; counts the decision.

        A fixed bar of "no rise at all" on ~20 labels rolled back ~75% of updates made from honest
        labels (noise, not harm: bench_tabular, the demo's rotate phase); the paired standard error
        lets noise through and still stops a rise that many held-back labels agree on.
        """
        margin = self.config.tolerance
        if before is not None and after is not None and len(before) > 2 and len(after) > 2 \
                and len(before[2]) == len(after[2]) and len(before[2]) > 1:
            diff = after[2] - before[2]
            margin += self.config.significance * float(diff.std() / len(diff) ** 0.5)
        ok = before is None or after is None or after[0] <= before[0] + margin
        self.accepted += ok
        self.rolled_back += not ok
        kept = after if ok else before
        self.last_error = kept[1] if kept else None
        return ok

    @property
    def _holdout_state(self) -> dict:
        if not self._holdout:
            return {"x": torch.empty(0), "y": torch.empty(0)}
        # at the dtype they came in: the saved record is the same whatever is kept compact
        return {"x": self._inputs(), "y": torch.stack([y for _, y in self._holdout])}

    @_holdout_state.setter
    def _holdout_state(self, value: dict) -> None:
        x = value["x"]
        self._dtype = x.dtype if len(x) else None
        self._holdout = deque(((compact(xi.unsqueeze(0))[0], yi) for xi, yi in zip(list(x), list(value["y"]))),
                              maxlen=self.config.holdout_size)

    def status(self) -> dict:
        return {"holdout": len(self._holdout), "accepted": self.accepted, "rolled_back": self.rolled_back,
                "holdout_error": self.last_error}
