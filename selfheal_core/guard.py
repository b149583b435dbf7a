"""Guard: an update is kept only if it does not raise the loss on held-back labels.

The judged quantity is the cross-entropy on the holdout, not its 0/1 error:
on a few dozen labels the error is coarse, and a ratchet of updates that each
leave it unchanged can still wreck the model; the loss moves with every step.

Every `holdout_every`-th label is withheld from training and kept (bounded) as
a validation set of recent ground truth; labels pushed out of the holdout are
handed back for training, so no label is wasted.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F
from torch import nn

from selfheal_core.config import GuardConfig


class Guard:
    """Validates updates on held-back recent labels and counts decisions."""

    def __init__(self, config: GuardConfig = GuardConfig()) -> None:
        self.config = config
        self._holdout: deque[tuple[torch.Tensor, int]] = deque()
        self._count = 0  # labels offered to the guard
        self.accepted = 0
        self.rolled_back = 0
        self.last_error: float | None = None

    def admit(self, x: torch.Tensor, y: torch.Tensor,
              skip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold back every k-th pair; return the pairs for training (incl. ones leaving the holdout).

        Pairs marked in `skip` (quarantined) are neither trained on nor held back, but they
        count, so the holdout stays every k-th label of the stream whatever the quarantine does.
        """
        train_x, train_y = [], []
        skip_list = skip.tolist() if skip is not None else [False] * len(y)
        for xi, yi, skipped in zip(x.detach().cpu(), y.tolist(), skip_list):
            self._count += 1
            if skipped:
                continue
            if self._count % self.config.holdout_every == 0:
                self._holdout.append((xi.clone(), int(yi)))
                if len(self._holdout) > self.config.holdout_size:
                    xi, yi = self._holdout.popleft()
                else:
                    continue
            train_x.append(xi)
            train_y.append(int(yi))
        if not train_x:
            return x[:0].cpu(), torch.empty(0, dtype=torch.long)
        return torch.stack(train_x), torch.tensor(train_y, dtype=torch.long)

    @property
    def holdout_size(self) -> int:
        return len(self._holdout)

    @property
    def ready(self) -> bool:
        """Enough held-back labels to judge an update."""
        return len(self._holdout) >= self.config.min_holdout

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float] | None:
        """(cross-entropy, error) of `model` on the holdout; None while it is empty."""
        if not self._holdout:
            return None
        device = next(model.parameters()).device
        x = torch.stack([x for x, _ in self._holdout]).to(device)
        y = torch.tensor([y for _, y in self._holdout], device=device)
        logits = model(x)
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) != y).float().mean())

    def judge(self, before: tuple[float, float] | None, after: tuple[float, float] | None) -> bool:
        """Accept unless the held-back loss rose beyond the tolerance; counts the decision."""
        ok = before is None or after is None or after[0] <= before[0] + self.config.tolerance
        self.accepted += ok
        self.rolled_back += not ok
        kept = after if ok else before
        self.last_error = kept[1] if kept else None
        return ok

    def state_dict(self) -> dict:
        xs = torch.stack([x for x, _ in self._holdout]) if self._holdout else torch.empty(0)
        ys = torch.tensor([y for _, y in self._holdout], dtype=torch.long)
        return {"holdout_x": xs, "holdout_y": ys, "count": self._count, "accepted": self.accepted,
                "rolled_back": self.rolled_back, "last_error": self.last_error}

    def load_state_dict(self, state: dict) -> None:
        keys = {"holdout_x", "holdout_y", "count", "accepted", "rolled_back", "last_error"}
        if set(state) != keys:
            raise ValueError(f"Guard state keys {sorted(state)} != {sorted(keys)}")
        self._holdout = deque(list(zip(list(state["holdout_x"]), state["holdout_y"].tolist()))
                              [-self.config.holdout_size:])
        self._count, self.accepted = int(state["count"]), int(state["accepted"])
        self.rolled_back, self.last_error = int(state["rolled_back"]), state["last_error"]

    def reset(self) -> None:
        self.__init__(self.config)

    def status(self) -> dict:
        return {"holdout": len(self._holdout), "accepted": self.accepted, "rolled_back": self.rolled_back,
                "holdout_error": self.last_error}
