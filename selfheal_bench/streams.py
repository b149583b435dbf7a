"""What the label-free benchmarks share: temporally correlated class order, the online run, windows,
and SelfHealer with its shipped defaults as a method beside the peers of `selfheal_bench.tta`."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from selfheal_core import HealConfig, SelfHealer


def correlated(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator,
               delta: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder (x, y) into class runs as NOTE, RoTTA and the test-time-adaptation benchmark do: each
    class's samples are split over C time slots by Dirichlet(delta) shares (0.01: nearly all in one
    slot; a full slot takes no more), slots play in order, and within a slot class by class."""
    labels = y.numpy()
    classes = np.unique(labels)
    cap = len(labels) / len(classes)
    slots: list[list[np.ndarray]] = [[] for _ in classes]
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        sizes = np.array([sum(map(len, s)) for s in slots])
        shares = rng.dirichlet(np.full(len(classes), delta)) * (sizes < cap)
        if shares.sum() <= 0:  # the draw favoured only full slots: the class goes to the last slot
            shares = np.eye(len(classes))[-1]
        cuts = (np.cumsum(shares / shares.sum()) * len(idx)).astype(int)[:-1]
        for s, part in zip(slots, np.split(idx, cuts)):
            s.append(part)
    order = np.concatenate([part for s in slots for part in rng.permutation(np.array(s, dtype=object))])
    order = torch.from_numpy(order.astype(np.int64))
    return x[order], y[order]


class Healer:
    name = "selfheal"

    def __init__(self, model: nn.Module, reference: torch.Tensor, labels: torch.Tensor,
                 config: HealConfig | None = None) -> None:
        self.healer = SelfHealer(model, reference, config or HealConfig(), reference_labels=labels)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.healer.predict(x).argmax(1)


def run(method, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-sample correctness, predicting each request before the method adapts on it."""
    out = []
    for i in range(0, len(y), batch):
        out.append(method(x[i:i + batch]) == y[i:i + batch])
    return torch.cat(out).float()


def windows(correct: torch.Tensor, size: int = 1_000) -> np.ndarray:
    n = len(correct) // size
    return 1 - correct[: n * size].view(n, size).mean(1).numpy()
