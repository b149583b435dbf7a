"""Quarantine: labels that look like poisoning are logged but not learned.

The signal is *confident disagreement*: a label that contradicts a prediction
the model made with high confidence. Ordinary label noise spreads such
disagreements over all classes; real drift either blurs the model (it stops
being confident) or moves a class's meaning (a concept change: inputs the
model calls `a` are now labelled `b`, one source class per target). A burst
that pushes inputs the model confidently puts in *several* classes into *one*
given class, far beyond its share of the recent disagreements, is what a
poisoner or a broken labeller does; those labels are quarantined while the
burst lasts. An attack that copies a concept change (one source, one target)
cannot be told apart from it by labels alone and is left to the guard.

Isolated confident disagreements are *held* (logged, not learned) until the
same (served, given) pair has been seen `corroborate` times in the window:
random label noise almost never repeats a pair, while a concept change
repeats its pair with every label. Labels the model was unsure about are
never held, and nothing is held while the monitor sees the inputs drift:
then confident mistakes are what the labels must correct (measured on
rotated digits at 1% feedback: holding them costs 7 points).
"""
from __future__ import annotations

from collections import Counter, deque

import torch

from selfheal_core.config import GuardConfig
from selfheal_core.state import StateMixin


class Quarantine(StateMixin):
    """Screens labelled samples over a sliding window of recent ones (classifiers)."""

    _state_keys = ("_window_state", "quarantined", "held", "_active")

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        self._window: deque[tuple[int, int, bool]] = deque()  # (served, given, confident disagreement)
        self._pairs: Counter = Counter()  # (served, given) -> confident disagreements in the window
        self._targets: dict[int, Counter] = {}  # given -> Counter of served, confident disagreements only
        self._suspects = 0
        self.quarantined = 0  # labels quarantined so far (bursts)
        self.held = 0  # isolated confident disagreements held so far
        self._active: list[int] = []  # given classes quarantined at the last check

    def _push(self, s: int, g: int, suspect: bool) -> None:
        self._window.append((s, g, suspect))
        if suspect:
            self._pairs[(s, g)] += 1
            self._targets.setdefault(g, Counter())[s] += 1
            self._suspects += 1
        if len(self._window) > self.config.quarantine_window:
            os, og, old = self._window.popleft()
            if old:
                self._pairs[(os, og)] -= 1
                self._targets[og][os] -= 1
                if not self._targets[og][os]:
                    del self._targets[og][os]
                self._suspects -= 1

    def checkpoint(self) -> tuple:
        """A copy to roll back to (a failed append must leave the window as it was)."""
        return list(self._window), self.quarantined, self.held, list(self._active)

    def rollback(self, checkpoint: tuple) -> None:
        window, quarantined, held, active = checkpoint
        self.reset()
        for item in window:
            self._push(*item)
        self.quarantined, self.held, self._active = quarantined, held, list(active)

    def screen(self, served: torch.Tensor, given: torch.Tensor, confidence: torch.Tensor,
               inputs_drifted: bool = False) -> torch.Tensor:
        """Bool mask (B,): True for labels not to learn (quarantined or held). Updates the window."""
        c = self.config
        out = torch.zeros(len(given), dtype=torch.bool)
        for i, (s, g, conf) in enumerate(zip(served.tolist(), given.tolist(), confidence.tolist())):
            if s < 0:  # what was served is unknown: nothing to compare
                continue
            suspect = s != g and conf >= c.quarantine_confidence
            self._push(s, g, suspect)
            self._active = self._burst_targets()
            if not suspect:
                continue
            if g in self._active:
                out[i] = True
                self.quarantined += 1
            elif not inputs_drifted and self._pairs[(s, g)] < c.corroborate:
                out[i] = True
                self.held += 1
        return out

    def _burst_targets(self) -> list[int]:
        c = self.config
        return sorted(g for g, sources in self._targets.items()
                      if sum(sources.values()) >= c.quarantine_min_count
                      and sum(sources.values()) >= c.quarantine_share * self._suspects
                      and len(sources) >= c.quarantine_min_sources)

    @property
    def _window_state(self) -> torch.Tensor:
        return torch.tensor([[s, g, int(b)] for s, g, b in self._window], dtype=torch.long).reshape(-1, 3)

    @_window_state.setter
    def _window_state(self, value: torch.Tensor) -> None:
        quarantined, held, active = self.quarantined, self.held, self._active
        self.reset()
        for s, g, b in value.tolist():
            self._push(s, g, bool(b))
        self.quarantined, self.held, self._active = quarantined, held, active

    def status(self) -> dict:
        return {"active": bool(self._active), "classes": list(self._active), "quarantined": self.quarantined,
                "held_uncorroborated": self.held, "window": len(self._window),
                "confident_disagreements": self._suspects}
