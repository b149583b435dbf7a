"""Bounded record of recent predictions, so that feedback can name a prediction by id."""
from __future__ import annotations

import uuid
from collections import OrderedDict

import torch


class RecentPredictions:
    """The newest `capacity` predictions: id -> (input, served label). Each id takes feedback once.

    >>> rec = RecentPredictions(capacity=2)
    >>> ids = rec.add(torch.zeros(3, 4), torch.tensor([1, 2, 0]))
    >>> len(rec), ids[0] in rec, ids[2] in rec
    (2, False, True)
    """

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[torch.Tensor, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, pid: str) -> bool:
        return pid in self._items

    def add(self, x: torch.Tensor, labels: torch.Tensor) -> list[str]:
        """Record a batch; returns one new id per row."""
        ids = []
        for xi, yi in zip(x.detach().cpu(), labels.tolist()):
            pid = uuid.uuid4().hex
            self._items[pid] = (xi.clone(), int(yi))
            ids.append(pid)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return ids

    def get(self, pid: str) -> tuple[torch.Tensor, int] | None:
        return self._items.get(pid)

    def pop_many(self, pids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove and return (inputs, served labels) for ids already checked to be present."""
        items = [self._items.pop(pid) for pid in pids]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)
