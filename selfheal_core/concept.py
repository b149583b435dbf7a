"""Labels checked against trusted data: suspected concept changes, held until a policy releases them.

A targeted relabelling (an attacker calls every 3 an 8) and a genuine concept
change (the business now calls them 8) look the same in the labels. What
tells them apart from honest labels is the trusted labelled reference: a
label on an input that sits among reference inputs of class m (its nearest
neighbours in the model's feature space agree on m, and it is no farther from
them than reference inputs are from each other, by place or, more strictly,
by direction) but says g != m contradicts it. Inputs that drifted away from the reference are not judged: there the
reference no longer speaks, and labels are what must correct the model. Once the reference has raised a
pair (m, g), though, a label g on an input it cannot place is held when the source weights (which
learning never moves) confidently call that input m: a poisoner's inputs just beyond the reference's
reach otherwise slip through one by one.

Contradictions are counted per pair (m, g); a pair seen `min_count` times is
a *suspected concept change* (pair, count, since when), reported whatever the
policy. Its labels are held (logged, not learned) from the first one
(contradictions that come into a class at most once per `rate_window` labels
are sporadic, not a relabelling: their held labels are then learned):
- `hold`: until an operator approves or discards the pair. Nothing in the
  rest of the traffic releases it: drift elsewhere is what an attacker can
  cause by sending other inputs beside the poisoned labels;
- `learn`: learned once the pair persisted `corroborate` labels and a label
  of it says what most recent labels around it say (`consistency` of the
  2 x `corroborate` nearest of the last `RECENT` labels the reference spoke for):
  label noise and a minority of bad labels never get there, a swapped class or
  a region whose meaning moved does within a few labels. Its held labels are
  learned too, then at most as many per `rate_window` labels as its reference
  class would bring there (`max_share` x the class's reference share x the
  window): a swapped class is learned as fast as its labels arrive, and no
  pair moves the model faster than its class's own traffic (bounded influence).
Approving a pair also relabels the reference (its class-m inputs now mean g),
so reference replay and the per-class check follow the new concept.
Discarding drops the pair's labels; the learner restores the state it had
before it learned any of them.
"""
from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from selfheal_core.config import GuardConfig
from selfheal_core.learn.compact import compact, keep, widen
from selfheal_core.state import StateMixin

HOLD, LEARN = "hold", "learn"
DIRECTION_QUANTILE = 0.75  # the radius by direction: this quantile of the reference's nearest-neighbour angles
RECENT = 1_000  # recent labels kept (features and label) to judge whether a contradiction is local consensus


@dataclass
class Pair:
    """One suspected relabelling: the reference says `source`, the labels say `target`."""

    source: int
    target: int
    count: int = 0  # contradicting labels seen
    since_seq: int | None = None  # log sequence number of the first one
    since_time: float | None = None
    state: str = "watching"  # watching, suspected, learning, approved, discarded
    learned: int = 0  # of its labels released to training
    recent: deque = field(default_factory=lambda: deque())  # label counts at which its labels were learned
    first_seen: int | None = None  # labels screened when its first contradiction came

    def as_dict(self) -> dict:
        return {"pair": [self.source, self.target], "count": self.count, "since_seq": self.since_seq,
                "since_time": self.since_time, "state": self.state, "learned": self.learned}


class ConceptWatch(StateMixin):
    """Finds labels that contradict the trusted reference; holds them by pair under a policy."""

    _state_keys = ("_pairs_state", "_held_state", "_seen", "_ref_labels", "_trusted", "_recent_x", "_recent_y")

    def __init__(self, config: GuardConfig, k: int = 10) -> None:
        self.config = config
        self.policy = config.concept_change
        self.k = k
        self._ref_feats = torch.zeros(0, 0, dtype=torch.float64)  # (R, F) reference through the current weights
        self._trusted = torch.zeros(0, dtype=torch.long)  # (R,) the reference's own labels, never changed
        self._ref_labels = self._trusted  # (R,) as the approved relabellings have them (all at once: a swap)
        self._radius = float("inf")
        self._ref_dirs = self._ref_feats  # (R, F) the reference features' directions (unit length)
        self._dir_radius = float("inf")
        self._reset()

    def _reset(self) -> None:
        self._pairs: dict[tuple[int, int], Pair] = {}
        self._held: list[tuple[int, torch.Tensor, int, float, int]] = []  # (seq, x, label, time, source)
        self._held_dtype: torch.dtype | None = None  # the held inputs' dtype as they came in (kept compact)
        self.dropped = 0  # held labels not kept in memory: the hold was full (count or bytes)
        self._seen = 0  # labels screened
        self._recent_x = torch.zeros(0, 0)  # (<= RECENT, F) features of the newest labels the reference spoke for
        self._recent_y = torch.zeros(0, dtype=torch.long)  # ... and their labels

    def reset(self) -> None:
        """Forget pairs and held labels; the reference labels go back to the trusted ones at the next fit."""
        self._reset()
        self._trusted = self._ref_labels = torch.zeros(0, dtype=torch.long)

    # ------------------------------------------------------------------ the reference
    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """The labelled reference through the current weights: features (R, F), labels (R,)."""
        if not len(self._ref_labels):
            self._trusted = labels.cpu().long().clone()
            self._ref_labels = self._trusted.clone()
        self._ref_feats = features.detach().to("cpu", torch.float64)
        self._radius = _radius(self._ref_feats, 0.95)
        self._ref_dirs = torch.nn.functional.normalize(self._ref_feats, dim=1)
        self._dir_radius = _radius(self._ref_dirs, DIRECTION_QUANTILE)

    @property
    def ready(self) -> bool:
        return len(self._ref_feats) > self.k

    @property
    def reference_labels(self) -> torch.Tensor:
        """The reference's labels as the approved concept changes have them."""
        return self._ref_labels

    @torch.no_grad()
    def judge(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the reference says each input is: (speaks, leans), each (B,) a class or -1.
        `speaks`: near the reference and its neighbours agree; only these contradictions are
        counted. `leans`: the neighbours' majority within twice the radius; a label against a pair
        already suspected is held on a lean too, so an attack cannot slip through on the borderline
        inputs of the class it targets."""
        f = features.detach().to("cpu", torch.float64).flatten(1)
        speaks, leans = self._vote(f, self._ref_feats, self._radius, 0.8)
        # The same by direction alone: an input scaled up (x1.6) leaves the radius but keeps its
        # direction, and an attacker used exactly that to have every poisoned label pass unjudged
        # (issue 26 C). Stricter (all k neighbours agree, a tighter radius), because drifted inputs
        # keep their direction more often than their place: measured on Digits-C severity 5, it
        # speaks wrongly for at most 1% of honest rotated, translated or noisy inputs, and for none
        # of the scaled ones, of which it speaks for 69%.
        d_speaks, d_leans = self._vote(torch.nn.functional.normalize(f, dim=1), self._ref_dirs, self._dir_radius, 1.0)
        speaks = torch.where(speaks >= 0, speaks, d_speaks)
        leans = torch.where(leans >= 0, leans, d_leans)
        return speaks, leans

    def _vote(self, f: torch.Tensor, ref: torch.Tensor, radius: float, agreement: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
        dist, idx = torch.cdist(f, ref).topk(self.k, dim=1, largest=False)  # (B, k)
        votes = self._ref_labels[idx]  # (B, k)
        mode = votes.mode(1).values
        agree = (votes == mode[:, None]).float().mean(1)
        none = torch.full_like(mode, -1)
        speaks = torch.where((dist[:, 0] <= radius) & (agree >= agreement), mode, none)
        leans = torch.where((dist[:, 0] <= 2 * radius) & (agree >= 0.5), mode, none)
        return speaks, leans

    # ------------------------------------------------------------------ screening
    def screen(self, features: torch.Tensor, given: torch.Tensor, x: torch.Tensor, seqs: list[int] | None,
               times: list[float] | None, skip: torch.Tensor | None = None,
               served: torch.Tensor | None = None) -> torch.Tensor:
        """Bool mask (B,): labels held (contradicting the reference, not yet released). Each label
        is judged on its own input: nothing else in the traffic (a drift an attacker can cause by
        sending other inputs) releases it. `skip` (B,): labels quarantined already (suspected
        poisoning): not judged, counted, kept or released, so they can neither corroborate a
        relabelling nor be learned through one. `served` (B,): the class served with confidence
        (-1: unsure or unknown); where the reference neither speaks nor leans against the label,
        it stands in, but only to extend a pair the reference itself already suspects."""
        n = len(given)
        held = torch.zeros(n, dtype=torch.bool)
        if not self.ready or n == 0:
            self._seen += n
            return held
        says, leans = self.judge(features)
        f = features.detach().to("cpu", torch.float32).flatten(1)
        if self._recent_x.shape[1:] != f.shape[1:]:  # none kept yet (or another feature width): start over
            self._recent_x, self._recent_y = f[:0], self._recent_y[:0]
        spoken: list[int] = []  # this batch's labels the reference spoke for, joined to the recent ones at the end
        skipped = skip.tolist() if skip is not None else [False] * n
        confident = served.tolist() if served is not None else [-1] * n
        for i, (m, lean, g) in enumerate(zip(says.tolist(), leans.tolist(), given.tolist())):
            self._seen += 1
            if skipped[i]:
                continue
            if m < 0 and lean >= 0 and lean != g and self._suspects(lean, g):
                m = lean
            elif m < 0 and 0 <= confident[i] != g and self._suspects(confident[i], g):
                # beyond the reference's reach (e.g. a poisoned 3 scaled by 1.6 that, by direction,
                # sits between 3s and 8s) the model's confident answer extends the suspicion: such
                # labels slipped through one by one and cost 1.7 points of probe accuracy (issue 26 C)
                m = confident[i]
            if m < 0:
                continue
            spoken.append(i)
            if m == g:
                continue
            pair = self._pairs.setdefault((m, g), Pair(m, g))
            if pair.state == "discarded":
                held[i] = True  # an operator discarded this pair: its labels are not learned
                continue
            pair.count += 1
            if pair.first_seen is None:
                pair.first_seen = self._seen
            if pair.since_seq is None:
                pair.since_seq = seqs[i] if seqs else None
                pair.since_time = times[i] if times else None
            if pair.count >= self.config.concept_min_count and pair.state == "watching":
                pair.state = "suspected"
            local = functools.partial(self._local, f, given, i, spoken)  # only computed when it decides
            if pair.state == "approved" or self._release(pair, local):
                pair.learned += 1
                pair.recent.append(self._seen)
                continue
            held[i] = True
            room = min(self.config.concept_hold_max, self.config.concept_hold_bytes // max(1, x[i].numel() * x.element_size()))
            if len(self._held) < room:  # counted at the dtype it came in, kept compact (a quarter for images)
                self._held_dtype = x.dtype
                self._held.append((seqs[i] if seqs else -1, keep(x[i].detach().cpu()), int(g),
                                   times[i] if times else 0.0, int(m)))
            else:  # in the log only: an approval cannot learn it from memory
                self.dropped += 1
        if spoken:
            self._recent_x = torch.cat([self._recent_x, f[spoken]])[-RECENT:]
            self._recent_y = torch.cat([self._recent_y, given[spoken].cpu().long()])[-RECENT:]
        return held

    def raised(self) -> set[tuple[int, int]]:
        """The pairs the reference has raised (suspected, learning, approved or discarded)."""
        return {key for key, pair in self._pairs.items() if pair.state != "watching"}

    def _suspects(self, source: int, target: int) -> bool:
        """Whether the reference already raised the pair (source, target) (past watching)."""
        pair = self._pairs.get((source, target))
        return pair is not None and pair.state != "watching"

    def _local(self, f: torch.Tensor, given: torch.Tensor, i: int, spoken: list[int]) -> float:
        """Share of label i's nearest recent labels (the 2 x `concept_corroborate` nearest of the kept
        ones and this batch's earlier ones) that say what it says."""
        before = [j for j in spoken if j < i]
        pool_x = torch.cat([self._recent_x, f[before]])  # screen() made the kept features f's width
        pool_y = torch.cat([self._recent_y, given[before].cpu().long()])
        k = min(2 * self.config.concept_corroborate, len(pool_y))
        if k == 0:
            return 0.0
        idx = torch.cdist(f[i:i + 1], pool_x)[0].topk(k, largest=False).indices
        return float((pool_y[idx] == int(given[i])).float().mean())

    def _release(self, pair: Pair, local: Callable[[], float]) -> bool:
        """Whether this contradicting label may be learned now (bounded speed)."""
        c = self.config
        if self.policy == HOLD:
            # only an operator releases (approve): a confidence alarm in the traffic once did, and an
            # attacker sending drifted inputs beside clean poisoned labels released 458 of them (issue 26 B)
            ok = False
        elif pair.state == "learning":
            ok = True
        else:
            ok = (pair.count >= c.concept_corroborate and pair.state == "suspected"
                  and local() >= c.concept_consistency)
            if ok:
                pair.state = "learning"
        return ok and self._room(pair)

    def _room(self, pair: Pair) -> bool:
        """Whether the pair may learn one more label in the current rate window."""
        c = self.config
        while pair.recent and pair.recent[0] <= self._seen - c.concept_rate_window:
            pair.recent.popleft()
        return len(pair.recent) < self.rate_cap(pair.source)

    def rate_cap(self, source: int) -> int:
        """Labels of a (source, g) pair learnable per rate window under `learn`: the count class
        `source` brings there at its reference share, times `concept_max_share` (at least 1)."""
        share = float((self._ref_labels == source).double().mean()) if len(self._ref_labels) else 1.0
        return max(1, math.ceil(self.config.concept_max_share * share * self.config.concept_rate_window))

    def release(self, suspect: frozenset[int] | set[int] = frozenset()) -> list[tuple]:
        """Held labels to learn now, as (seq, x, label, time):
        - policy learn: of pairs being learned, newest first, as far as each pair's rate allows
          (the corroboration window's labels are honest if the pair is);
        - any policy: of pairs not (yet) suspected, into a class that contradictions from any
          source have come into at most once per `concept_rate_window` labels since the first.
          A relabelling repeats its pair faster (a 2% drip: four times in 200 labels) and is
          suspected at its `concept_min_count`-th label; what stays sporadic is the reference
          speaking (wrongly) for a drifted input, and those honest labels were held for good:
          11 of 600 on rotated digits, 13 of 600 on noisy ones. Never into a class in `suspect`
          (the quarantine's: a broken labeller into it)."""
        if not self._held:
            return []
        # contradictions into each given class, from every source, and since when: a broken
        # labeller spreads them over many pairs, each sporadic, all into one class
        into: dict[int, tuple[int, int]] = {}
        for p in self._pairs.values():
            if p.first_seen is not None:
                count, since = into.get(p.target, (0, p.first_seen))
                into[p.target] = (count + p.count, min(since, p.first_seen))
        out, keep = [], []
        for h in reversed(self._held):
            pair = self._pairs.get((h[4], h[2]))
            if pair is None:
                keep.append(h)
            elif self.policy == LEARN and pair.state == "learning" and self._room(pair):
                pair.learned += 1
                pair.recent.append(self._seen)
                out.append(h[:4])
            elif (pair.state == "watching" and pair.first_seen is not None and pair.target not in suspect
                  and into[pair.target][0] * self.config.concept_rate_window <= self._seen - into[pair.target][1]):
                pair.learned += 1
                out.append(h[:4])
            else:
                keep.append(h)
        self._held = keep[::-1]
        return out

    # ------------------------------------------------------------------ decisions
    def approve(self, source: int, target: int) -> list[tuple]:
        """The relabelling is the new concept: learn its held labels, and the reference follows it.
        Returns the held (seq, x, label, time) to learn."""
        pair = self._get(source, target)
        pair.state = "approved"
        self._relabel()
        released = [h for h in self._held if h[4] == source and h[2] == target]
        self._held = [h for h in self._held if not (h[4] == source and h[2] == target)]
        pair.learned += len(released)
        return [h[:4] for h in released]

    def _relabel(self) -> None:
        """The reference labels under every approved relabelling, mapped from the trusted ones at
        once: approving 1 -> 2 and then 2 -> 1 (a swap) used to relabel the reference's new 2s back
        to 1, merging both classes into one, and the swapped classes were never learned."""
        mapping = {p.source: p.target for p in self._pairs.values() if p.state == "approved"}
        labels = self._trusted.clone()
        for source, target in mapping.items():
            labels[self._trusted == source] = target
        self._ref_labels = labels

    def discard(self, source: int, target: int) -> list[int]:
        """The relabelling is poisoning: its held labels are dropped (their seqs returned) and later
        ones held for good."""
        pair = self._get(source, target)
        pair.state = "discarded"
        dropped = [h[0] for h in self._held if h[4] == source and h[2] == target]
        self._held = [h for h in self._held if not (h[4] == source and h[2] == target)]
        return dropped

    def decisions(self) -> list[tuple[int, int, str]]:
        """The operators' decisions so far: (source, target, "approved" | "discarded")."""
        return [(p.source, p.target, p.state) for p in self._pairs.values() if p.state in ("approved", "discarded")]

    def reapply(self, decisions: list[tuple[int, int, str]]) -> None:
        """Take `decisions()` of a later state again (after going back to an earlier one): a pair
        this state has not seen yet is created in its decided state."""
        for source, target, state in decisions:
            self._pairs.setdefault((source, target), Pair(source, target))
            (self.discard if state == "discarded" else self.approve)(source, target)

    def _get(self, source: int, target: int) -> Pair:
        pair = self._pairs.get((source, target))
        if pair is None:
            raise KeyError(f"no relabelling {source} -> {target} has been seen")
        return pair

    @property
    def moved(self) -> set[int]:
        """Reference classes whose meaning the feedback changed and that are being learned
        (policy learn, corroborated): their reference labels no longer hold."""
        return {p.source for p in self._pairs.values() if p.state == "learning"}

    def learned_of(self, source: int, target: int) -> int:
        pair = self._pairs.get((source, target))
        return pair.learned if pair else 0

    # ------------------------------------------------------------------ state
    @property
    def suspected(self) -> list[dict]:
        return [p.as_dict() for p in self._pairs.values() if p.state != "watching"]

    def status(self) -> dict:
        return {"policy": self.policy, "suspected": self.suspected, "held": len(self._held), "dropped": self.dropped,
                "reference_radius": round(self._radius, 4) if self._radius != float("inf") else None}

    @property
    def _pairs_state(self) -> list[dict]:
        return [dict(p.as_dict(), recent=list(p.recent), first_seen=p.first_seen) for p in self._pairs.values()]

    @_pairs_state.setter
    def _pairs_state(self, value: list[dict]) -> None:
        self._pairs = {}
        for d in value:
            p = Pair(d["pair"][0], d["pair"][1], d["count"], d["since_seq"], d["since_time"], d["state"], d["learned"],
                     deque(d["recent"]), d.get("first_seen"))  # saved before it was kept: never stale
            self._pairs[(p.source, p.target)] = p

    @property
    def _held_state(self) -> dict:
        if not self._held:
            return {"seq": [], "x": torch.empty(0), "label": [], "time": [], "source": []}
        # at the dtype they came in (some are kept compact, some exact)
        dtype = self._held_dtype if self._held_dtype is not None else self._held[0][1].dtype
        return {"seq": [h[0] for h in self._held], "x": torch.stack([widen(h[1], dtype) for h in self._held]),
                "label": [h[2] for h in self._held], "time": [h[3] for h in self._held],
                "source": [h[4] for h in self._held]}

    def load_state_dict(self, state: dict) -> None:
        """As StateMixin; a state saved before the recent labels were kept starts without them, one
        saved before the trusted labels were kept apart takes its reference labels as trusted."""
        super().load_state_dict({"_recent_x": torch.zeros(0, 0), "_recent_y": torch.zeros(0, dtype=torch.long),
                                 "_trusted": state.get("_ref_labels", self._trusted), **state})

    @_held_state.setter
    def _held_state(self, value: dict) -> None:
        self._held_dtype = value["x"].dtype if len(value["seq"]) else None
        self._held = [(s, compact(x.unsqueeze(0))[0], lab, t, src) for s, x, lab, t, src in
                      zip(value["seq"], list(value["x"]), value["label"], value["time"], value["source"])]


def _radius(ref: torch.Tensor, quantile: float) -> float:
    """The `quantile` of each reference row's distance to its nearest other row (inf for one row)."""
    if len(ref) < 2:
        return float("inf")
    d = torch.cdist(ref, ref)
    d.fill_diagonal_(float("inf"))
    return float(d.min(1).values.quantile(quantile))
