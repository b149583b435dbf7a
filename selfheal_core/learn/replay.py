"""Bounded replay memory: the newest labels verbatim plus a reservoir of older ones."""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from selfheal_core.learn.compact import compact, keep, widen


class ReplayBuffer:
    """`recent_size` newest (x, y) pairs; pairs pushed out of `recent` enter a uniform
    reservoir of `reservoir_size` (Vitter's algorithm R), so memory is fixed while
    old domains stay represented. Targets are class labels or value vectors alike.
    Both sizes shrink in proportion when their pairs' inputs would exceed `max_bytes`
    (set by the first pair's size at the dtype it came in: a model's inputs are alike).
    Large inputs are kept compact (`compact`: a 224x224 image decoded from 8 bits takes a
    quarter of its float32 bytes, any other a half) and given back at the dtype they came in.
    """

    def __init__(self, recent_size: int, reservoir_size: int, seed: int = 0, max_bytes: int | None = None) -> None:
        if recent_size < 1 or reservoir_size < 0:
            raise ValueError(f"need recent_size >= 1 and reservoir_size >= 0, got {recent_size}, {reservoir_size}")
        self.recent_size = self.configured_recent = recent_size
        self.reservoir_size = self.configured_reservoir = reservoir_size
        self.max_bytes = max_bytes
        self.seed = seed
        self._dtype: torch.dtype | None = None  # the inputs' dtype as they came in: given back at it
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
            self._dtype = x.dtype
        for xi, yi in zip(x.detach().cpu(), y.detach().cpu()):
            self._recent.append((keep(xi), yi.clone()))  # per pair: one out-of-range input keeps only itself exact
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

    def _stack(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs as a batch, inputs at the dtype they came in."""
        dtype = self._dtype if self._dtype is not None else items[0][0].dtype
        return torch.stack([widen(x, dtype) for x, _ in items]), torch.stack([y for _, y in items])

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
        """Inputs as the list of tensors kept (half precision where compacted; stacking them was a
        copy of the whole buffer at every publish), targets stacked: snapshots load with
        torch.load(weights_only=True)."""

        def parts(items):
            return [x for x, _ in items], (torch.stack([y for _, y in items]) if items else torch.empty(0))

        (rx, ry), (sx, sy) = parts(self._recent), parts(self._reservoir)
        return {"recent_x": rx, "recent_y": ry, "reservoir_x": sx, "reservoir_y": sy,
                "seen": self._seen, "rng_state": self._gen.get_state(),
                "x_dtype": str(self._dtype).removeprefix("torch.") if self._dtype is not None else ""}

    def load_state_dict(self, state: dict) -> None:
        keys = {"recent_x", "recent_y", "reservoir_x", "reservoir_y", "seen", "rng_state"}
        if set(state) - {"x_dtype"} != keys:  # states saved before inputs were compacted lack x_dtype
            raise ValueError(f"ReplayBuffer state keys {sorted(state)} != {sorted(keys | {'x_dtype'})}")
        name = state.get("x_dtype") or ""  # saved before inputs were compacted: none, stacked at their dtype
        dtype = getattr(torch, name, None) if name else (state["recent_x"][0].dtype if len(state["recent_y"]) else None)
        if name and not isinstance(dtype, torch.dtype):
            raise ValueError(f"ReplayBuffer state x_dtype {name!r} is not a torch dtype")

        def pairs(xs, ys):
            return [(compact(x.unsqueeze(0))[0], y) for x, y in zip(list(xs), list(ys))]

        recent = pairs(state["recent_x"], state["recent_y"])
        reservoir = pairs(state["reservoir_x"], state["reservoir_y"])
        self._dtype = dtype
        if recent:
            x0, y0 = state["recent_x"][0], recent[0][1]
            self._fit_budget(x0.numel() * dtype.itemsize + y0.numel() * y0.element_size())
        self._recent = deque(recent[-self.recent_size:])
        self._reservoir = reservoir[: self.reservoir_size]
        self._seen = int(state["seen"])
        self._gen.set_state(state["rng_state"])
