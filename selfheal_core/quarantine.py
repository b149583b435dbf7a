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

A broken labeller during input drift escapes that test: drift makes the model
unsure, so its disagreements are not confident. It shows in the labels
themselves: one given class far above its share of the reference's labels,
disagreeing with what was served for inputs of several served classes. While
that lasts, labels into that class that disagree with what was served are
quarantined too, whatever the confidence (honest labels of that class the model
got wrong wait with them; genuine label shift moves predictions along, so it
rarely disagrees this way).

Bounded influence: labels of one (served, given) pair with served != given are
learned at most `pair_max_rate` per `pair_rate_window` labels, whatever else
the screens say; the excess is held.

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

    _state_keys = ("_window_state", "quarantined", "held", "_active", "rate_held", "_rates_state")

    def __init__(self, config: GuardConfig, reference_share: torch.Tensor | None = None) -> None:
        self.config = config
        self.reference_share = reference_share  # (C,) label frequencies of the labelled reference
        self.reset()

    def reset(self) -> None:
        self._window: deque[tuple[int, int, bool]] = deque()  # (served, given, confident disagreement)
        self._pairs: Counter = Counter()  # (served, given) -> confident disagreements in the window
        self._targets: dict[int, Counter] = {}  # given -> Counter of served, confident disagreements only
        self._suspects = 0
        self.quarantined = 0  # labels quarantined so far (bursts)
        self.held = 0  # isolated confident disagreements held so far
        self.rate_held = 0  # labels held by the per-pair rate limit
        self._active: list[int] = []  # given classes quarantined at the last check
        self._given: Counter = Counter()  # given class -> labels in the window
        self._disagree: dict[int, Counter] = {}  # given -> Counter of served, all disagreements in the window
        self._rates: dict[tuple[int, int], deque] = {}  # (served, given) -> label counts when learned
        self._count = 0  # labels screened

    def _push(self, s: int, g: int, suspect: bool) -> None:
        self._window.append((s, g, suspect))
        self._given[g] += 1
        if s != g:
            self._disagree.setdefault(g, Counter())[s] += 1
        if suspect:
            self._pairs[(s, g)] += 1
            self._targets.setdefault(g, Counter())[s] += 1
            self._suspects += 1
        if len(self._window) > self.config.quarantine_window:
            os, og, old = self._window.popleft()
            self._given[og] -= 1
            if os != og:
                self._disagree[og][os] -= 1
                if not self._disagree[og][os]:
                    del self._disagree[og][os]
            if old:
                self._pairs[(os, og)] -= 1
                self._targets[og][os] -= 1
                if not self._targets[og][os]:
                    del self._targets[og][os]
                self._suspects -= 1

    def screen(self, served: torch.Tensor, given: torch.Tensor, confidence: torch.Tensor,
               inputs_drifted: bool = False) -> torch.Tensor:
        """Bool mask (B,): True for labels not to learn (quarantined or held). Updates the window."""
        c = self.config
        out = torch.zeros(len(given), dtype=torch.bool)
        for i, (s, g, conf) in enumerate(zip(served.tolist(), given.tolist(), confidence.tolist())):
            self._count += 1
            if s < 0:  # what was served is unknown: nothing to compare
                continue
            suspect = s != g and conf >= c.quarantine_confidence
            self._push(s, g, suspect)
            self._active = sorted(set(self._burst_targets()) | set(self._overrepresented()))
            if s == g:
                continue
            if g in self._active and (suspect or g in self._overrepresented()):
                out[i] = True
                self.quarantined += 1
            elif suspect and not inputs_drifted and self._pairs[(s, g)] < c.corroborate:
                out[i] = True
                self.held += 1
            elif not self._rate_ok(s, g):
                out[i] = True
                self.rate_held += 1
        return out

    def _rate_ok(self, s: int, g: int) -> bool:
        """Bounded influence: room for one more learned label of the pair (s, g) in the window."""
        c = self.config
        times = self._rates.setdefault((s, g), deque())
        while times and times[0] <= self._count - c.pair_rate_window:
            times.popleft()
        if len(times) >= c.pair_max_rate:
            return False
        times.append(self._count)
        return True

    def _overrepresented(self) -> list[int]:
        """Given classes far above their reference share, disagreeing with several served classes."""
        c = self.config
        n = len(self._window)
        if self.reference_share is None or n < c.quarantine_min_count * 4:
            return []
        out = []
        for g, count in self._given.items():
            if not 0 <= g < len(self.reference_share):
                continue
            share, expected = count / n, float(self.reference_share[g])
            sources = self._disagree.get(g, Counter())
            if (share >= max(c.overrepresented * expected, expected + 0.15)
                    and sum(sources.values()) >= c.quarantine_min_count
                    and len(sources) >= c.quarantine_min_sources):
                out.append(g)
        return out

    def _burst_targets(self) -> list[int]:
        c = self.config
        return sorted(g for g, sources in self._targets.items()
                      if sum(sources.values()) >= c.quarantine_min_count
                      and sum(sources.values()) >= c.quarantine_share * self._suspects
                      and len(sources) >= c.quarantine_min_sources)

    @property
    def _rates_state(self) -> list:
        return [[s, g, list(t)] for (s, g), t in self._rates.items()] + [[-1, -1, [self._count]]]

    @_rates_state.setter
    def _rates_state(self, value: list) -> None:
        self._rates = {(s, g): deque(t) for s, g, t in value if s >= 0}
        self._count = next((t[0] for s, g, t in value if s < 0), 0)

    @property
    def _window_state(self) -> torch.Tensor:
        return torch.tensor([[s, g, int(b)] for s, g, b in self._window], dtype=torch.long).reshape(-1, 3)

    @_window_state.setter
    def _window_state(self, value: torch.Tensor) -> None:
        kept = self.quarantined, self.held, self._active, self.rate_held, self._rates, self._count
        self.reset()
        for s, g, b in value.tolist():
            self._push(s, g, bool(b))
        self.quarantined, self.held, self._active, self.rate_held, self._rates, self._count = kept

    @property
    def classes(self) -> list[int]:
        """Given classes quarantined at the last check (a burst or a broken labeller into them)."""
        return list(self._active)

    def status(self) -> dict:
        return {"active": bool(self._active), "classes": list(self._active), "quarantined": self.quarantined,
                "held_uncorroborated": self.held, "held_rate": self.rate_held, "window": len(self._window),
                "confident_disagreements": self._suspects}
