"""The hand-off from the serving thread to the thread that monitors and adapts.

One owner: the queue's own small lock guards its deque and its two totals;
`put` (serving thread) and `take_all` (draining thread) hold it only to move
references, never while computing. Bounded in samples and in bytes: when
either bound is passed the oldest forwards are shed, and what was shed is
counted in samples (what an operator compares with predictions served).
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any

import torch


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class PredictionQueue:
    """Forwards awaiting observation, oldest first; each item is (samples, bytes, payload).

    >>> q = PredictionQueue(max_samples=4, max_bytes=10**6)
    >>> q.put("a", 3, 10), q.put("b", 3, 10)
    (0, 3)
    >>> q.take_all(), q.shed_samples
    (['b'], 3)
    """

    def __init__(self, max_samples: int, max_bytes: int) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError(f"need max_samples >= 1 and max_bytes >= 1, got {max_samples}, {max_bytes}")
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self._lock = threading.Lock()
        self._items: deque[tuple[int, int, Any]] = deque()
        self._samples = self._bytes = 0
        self.shed_samples = 0  # samples dropped unobserved since start (or the last clear)
        self.shed_bytes = 0

    def put(self, payload: Any, samples: int, size: int) -> int:
        """Queue one forward's payload; returns the samples shed to stay within both bounds (the
        newest item is always kept)."""
        with self._lock:
            self._items.append((samples, size, payload))
            self._samples += samples
            self._bytes += size
            shed = 0
            while (self._samples > self.max_samples or self._bytes > self.max_bytes) and len(self._items) > 1:
                n, b, _ = self._items.popleft()
                self._samples -= n
                self._bytes -= b
                shed += n
                self.shed_bytes += b
            self.shed_samples += shed
            return shed

    def take_all(self) -> list[Any]:
        """Every payload queued, oldest first; the queue is empty afterwards."""
        with self._lock:
            items, self._items = self._items, deque()
            self._samples = self._bytes = 0
        return [payload for _, _, payload in items]

    def clear(self) -> None:
        self.take_all()

    @property
    def samples(self) -> int:
        return self._samples

    @property
    def bytes(self) -> int:
        return self._bytes
