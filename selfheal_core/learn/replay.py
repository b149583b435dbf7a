"""Bounded replay memory: the newest labels verbatim plus a reservoir of older ones."""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch


class ReplayBuffer:
    """`recent_size` newest (x, y) pairs; pairs pushed out of `recent` enter a uniform
    reservoir of `reservoir_size` (Vitter's algorithm R), so memory is fixed while
    old domains stay represented. Targets are class labels or value vectors alike.
    Both sizes shrink in proportion when their pairs' inputs would exceed `max_bytes`
    (set by the first pair's size: a model's inputs are alike).
    """

    def __init__(self, recent_size: int, reservoir_size: int, seed: int = 0, max_bytes: int | None = None) -> None:
        if recent_size < 1 or reservoir_size < 0:
            raise ValueError(f"need recent_size >= 1 and reservoir_size >= 0, got {recent_size}, {reservoir_size}")
        self.recent_size = self.configured_recent = recent_size
        self.reservoir_size = self.configured_reservoir = reservoir_size
        self.max_bytes = max_bytes
        self.seed = seed
        self._reset()

    def _fit_budget(self, pair_bytes: int) -> None:
        """Sizes for pairs of `pair_bytes`: within `max_bytes`, at least one recent pair."""
        if self.max_bytes is None or pair_bytes <= 0:
            return
        fits = max(1, self.max_bytes // pair_bytes)
        total = self.configured_recent + self.configured_reservoir
        if fits >= total:
            return
        self.recent_size = max(1, fits * self.configured_recent // total)
        self.reservoir_size = max(0, fits - self.recent_size)

    def _reset(self) -> None:
        self._recent: deque[tuple[torch.Tensor, torch.Tensor]] = deque()
        self._reservoir: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._seen = 0  # pairs that have left `recent`
        self._gen = torch.Generator().manual_seed(self.seed)

    def __len__(self) -> int:
        return len(self._recent) + len(self._reservoir)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Append a batch x (B, ...) with targets y (B, ...)."""
        if not len(self) and len(x):
            self._fit_budget(x[0].numel() * x.element_size() + y[0].numel() * y.element_size())
        for xi, yi in zip(x.detach().cpu(), y.detach().cpu()):
            self._recent.append((xi.clone(), yi.clone()))
            if len(self._recent) > self.recent_size:
                self._to_reservoir(self._recent.popleft())

    def _to_reservoir(self, item: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._seen += 1
        if len(self._reservoir) < self.reservoir_size:
            self._reservoir.append(item)
        elif self.reservoir_size:
            j = int(torch.randint(0, self._seen, (1,), generator=self._gen))
            if j < self.reservoir_size:
                self._reservoir[j] = item

    @staticmethod
    def _stack(items) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

    def sample(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k pairs drawn uniformly with replacement from recent and reservoir."""
        items = list(self._recent) + self._reservoir
        if not items:
            raise ValueError("replay buffer is empty")
        idx = torch.randint(0, len(items), (k,), generator=self._gen).tolist()
        return self._stack([items[i] for i in idx])

    def sample_newest(self, k: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k pairs drawn uniformly with replacement from the newest `window` pairs."""
        items = list(self._recent)[-window:]
        if not items:
            raise ValueError("replay buffer is empty")
        idx = torch.randint(0, len(items), (k,), generator=self._gen).tolist()
        return self._stack([items[i] for i in idx])

    def newest(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most recently added pairs (at most `recent_size`), oldest first."""
        items = list(self._recent)[-k:] if k > 0 else []
        if not items:
            raise ValueError("no recent pairs")
        return self._stack(items)

    def drop(self, match: Callable[[torch.Tensor, torch.Tensor], bool]) -> int:
        """Remove the pairs (x, y) `match` picks, wherever they are; returns how many."""
        before = len(self)
        self._recent = deque(item for item in self._recent if not match(*item))
        self._reservoir = [item for item in self._reservoir if not match(*item)]
        return before - len(self)

    def clear(self) -> None:
        self._reset()

    def keep_newest(self, k: int) -> None:
        """Forget all but the k most recently added pairs (the reservoir too)."""
        kept = list(self._recent)[-k:] if k > 0 else []
        self._reset()
        self._recent.extend(kept)

    def state_dict(self) -> dict:
        """Stacked tensors, so snapshots load with torch.load(weights_only=True)."""

        def stack(items):
            return self._stack(items) if items else (torch.empty(0), torch.empty(0))

        (rx, ry), (sx, sy) = stack(self._recent), stack(self._reservoir)
        return {"recent_x": rx, "recent_y": ry, "reservoir_x": sx, "reservoir_y": sy,
                "seen": self._seen, "rng_state": self._gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        keys = {"recent_x", "recent_y", "reservoir_x", "reservoir_y", "seen", "rng_state"}
        if set(state) != keys:
            raise ValueError(f"ReplayBuffer state keys {sorted(state)} != {sorted(keys)}")
        recent = list(zip(list(state["recent_x"]), list(state["recent_y"])))
        reservoir = list(zip(list(state["reservoir_x"]), list(state["reservoir_y"])))
        if recent:
            x0, y0 = recent[0]
            self._fit_budget(x0.numel() * x0.element_size() + y0.numel() * y0.element_size())
        self._recent = deque(recent[-self.recent_size:])
        self._reservoir = reservoir[: self.reservoir_size]
        self._seen = int(state["seen"])
        self._gen.set_state(state["rng_state"])
