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

import torch

from selfheal_core.config import GuardConfig
from selfheal_core.state import StateMixin


class Quarantine(StateMixin):
    """Screens labelled samples over a sliding window of recent ones."""

    _state_keys = ("_window", "quarantined", "held", "_active")

    def __init__(self, config: GuardConfig = GuardConfig()) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        self._window: list[list[int]] = []  # [served, given, confident disagreement 0/1], newest last
        self.quarantined = 0  # labels quarantined so far (bursts)
        self.held = 0  # isolated confident disagreements held so far
        self._active: list[int] = []  # given classes quarantined at the last check

    def checkpoint(self) -> tuple:
        """A cheap copy to roll back to (window entries are never changed in place: shared)."""
        return list(self._window), self.quarantined, self.held, list(self._active)

    def rollback(self, checkpoint: tuple) -> None:
        window, self.quarantined, self.held, active = checkpoint
        self._window, self._active = list(window), list(active)

    def screen(self, served: torch.Tensor, given: torch.Tensor, confidence: torch.Tensor,
               inputs_drifted: bool = False) -> torch.Tensor:
        """Bool mask (B,): True for labels not to learn (quarantined or held). Updates the window."""
        c = self.config
        out = torch.zeros(len(given), dtype=torch.bool)
        for i, (s, g, conf) in enumerate(zip(served.tolist(), given.tolist(), confidence.tolist())):
            suspect = int(s != g and conf >= c.quarantine_confidence)
            self._window.append([s, g, suspect])
            if len(self._window) > c.quarantine_window:
                self._window.pop(0)
            self._active = self._burst_targets()
            if not suspect:
                continue
            if g in self._active:
                out[i] = True
                self.quarantined += 1
            elif not inputs_drifted and sum(1 for ss, gg, bad in self._window if bad and ss == s and gg == g) < c.corroborate:
                out[i] = True
                self.held += 1
        return out

    def _burst_targets(self) -> list[int]:
        c = self.config
        suspects = [(s, g) for s, g, bad in self._window if bad]
        targets = []
        for g in sorted({g for _, g in suspects}):
            sources = [s for s, gg in suspects if gg == g]
            if (len(sources) >= c.quarantine_min_count and len(sources) >= c.quarantine_share * len(suspects)
                    and len(set(sources)) >= c.quarantine_min_sources):
                targets.append(g)
        return targets

    def status(self) -> dict:
        suspects = sum(bad for *_, bad in self._window)
        return {"active": bool(self._active), "classes": list(self._active), "quarantined": self.quarantined,
                "held_uncorroborated": self.held,
                "window": len(self._window), "confident_disagreements": suspects}
