"""The protocol every label-free corrector follows, and what it observes.

A corrector is fed drained batches (`observe`, off the request path) and may
change what the served model computes. Serving state is written only by the
thread that serves: `observe` computes new values and swaps them in by
reference, and `apply()` (called before a forward, on the serving thread)
copies them into the model. So a forward never reads a half-written tensor
and no lock is shared between the two threads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from selfheal_core.state import StateMixin


@dataclass
class Observation:
    """One drained batch of served predictions, oldest first."""

    raw: torch.Tensor  # (N, ...) raw model outputs, before any output correction
    probs: torch.Tensor | None = None  # (N, C) class probabilities (classifiers)
    features: torch.Tensor | None = None  # (N, F) float64 on the CPU: head inputs (or pooled inputs)
    inputs: torch.Tensor | None = None  # (N, ...) model inputs, kept only when a corrector needs them
    fired: list[str] = field(default_factory=list)  # detectors that alarmed on this batch, in order


class SampleBuffer:
    """Samples accumulated across requests until an adaptation step is due (batch size 1 works)."""

    def __init__(self, every: int, keep: int) -> None:
        self.every, self.keep = every, keep  # samples per step; newest samples a step uses at most
        self.clear()

    def clear(self) -> None:
        self._parts: list[torch.Tensor] = []
        self._pending = 0

    def add(self, x: torch.Tensor) -> torch.Tensor | None:
        """Buffer x (B, ...); the newest `keep` samples once `every` have arrived (then empty)."""
        self._parts.append(x)
        self._pending += len(x)
        if self._pending < self.every:
            return None
        batch = torch.cat(self._parts)[-self.keep:]
        self.clear()
        return batch


class Corrector(StateMixin):
    """Shared life cycle: enabled (the model has something to adapt), active, reset to source."""

    name = "corrector"
    needs_inputs = False  # whether `observe` needs Observation.inputs

    def __init__(self) -> None:
        self._active = False

    @property
    def enabled(self) -> bool:
        return True

    @property
    def active(self) -> bool:
        return self._active

    def activate(self) -> None:
        self._active = True

    def deactivate(self) -> None:
        self._active = False

    def observe(self, obs: Observation) -> None:
        """Adapt on a drained batch (background thread); serving tensors are not touched here."""

    def apply(self) -> None:
        """Copy the newest adapted values into the served model (serving thread)."""

    def reset(self) -> None:
        """Back to the source model exactly, inactive."""
        raise NotImplementedError

    def rebase(self, weights: dict[str, torch.Tensor]) -> None:
        """A new version's weights were installed: adapt from them from now on (serving thread)."""

    def status(self) -> dict:
        return {"active": self._active}
