"""The learning side: labelled feedback in log order -> guarded updates -> published versions.

A `Learner` owns its own copy of the model and everything labels change:
the replay buffer, the Bayesian last layer, the guard's holdout, the
quarantine, the feedback error detector and the position in the feedback
log. Nothing here serves requests; a worker installs what `publish()`
returns. In a server the learner runs in a process of its own (one per
model); in one process `SelfHealer` drives it directly.

Serving and learning must normalise alike: the learner takes the serving
side's adapted BatchNorm statistics (`context`) before it evaluates or trains,
so the weights it learns fit the statistics they will be served with.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from selfheal_core import label_age
from selfheal_core.concept import ConceptWatch
from selfheal_core.estimate import AccuracyEstimator, LabelledAccuracy
from selfheal_core.config import HealConfig
from selfheal_core.guard import Guard
from selfheal_core.learn import BayesianLastLayer, GradientLearner
from selfheal_core.learn.compact import compact, widen
from selfheal_core.model_parts import ActivationBudget, FeatureTap, find_parts, pool_inputs
from selfheal_core.monitor import LABEL_FREE, ON_FEEDBACK, Monitor, ReferenceView
from selfheal_core.plausible import PlausibleRange
from selfheal_core.quarantine import Quarantine
from selfheal_core.serving import (Published, check_inputs, model_device, rebase_values, reference_outputs,
                                   validate_reference)
from selfheal_core.source_check import SourceCheck
from selfheal_core.storage.base import DISCARDED, HELD, LEARNED, PAST, QUARANTINED, Entries, FeedbackLog, decode_targets
from selfheal_core.task import Task

log = logging.getLogger(__name__)

DELAYS_KEPT = 1_000  # label-to-weights delays kept for percentiles
CURRENT_TTL_S = 60.0  # how long features of the newest traffic stand for "now" when judging late labels
# 4: published weights apart from the learner's private record; 5: the published record carries
# the reference statistics workers install (`Published.rebase`), the reference view moved to the
# private record. Workers read both.
SNAPSHOT_FORMAT = 5
READABLE_FORMATS = (4, 5)


def _input_key(x: torch.Tensor) -> int:
    """An input's identity by its bytes as replay keeps them (`compact`; in this process: labels
    taken back are found by it)."""
    kept = compact(x.detach().cpu().unsqueeze(0))[0]
    return hash(kept.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def reference_of(*records: dict | None) -> ReferenceView | None:
    """The reference view a stored version was made with: in its private record (format 5) or
    its published one (format 4), the first record that has it."""
    for record in records:
        if isinstance(record, dict) and record.get("reference"):
            return ReferenceView(**record["reference"])
    return None


def published_from_snapshot(state: dict, meta: dict) -> Published:
    """What a worker installs from a stored version's published record (the weights that differ
    from the source model: the rest are the source's); ValueError for a format it cannot read."""
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise ValueError(f"unsupported snapshot format {state.get('format') if isinstance(state, dict) else None} "
                         f"(this selfheal reads {', '.join(map(str, READABLE_FORMATS))})")
    return Published(version=int(meta["version"]), weights=state["weights"], rebase=state.get("rebase"),
                     reference=reference_of(state) if state.get("rebase") is None else None)


@dataclass
class UpdateResult:
    updated: bool = False
    rolled_back: bool = False


class Learner:
    """Learns from labelled pairs with a guarded, replay-regularised update; publishes versions.

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    >>> learner = Learner(model, torch.randn(100, 4), reference_targets=torch.randint(0, 3, (100,)))
    >>> held = learner.absorb(torch.randn(20, 4), torch.randint(0, 3, (20,)))  # every 5th is held back
    >>> result = learner.update()
    >>> result.updated or result.rolled_back, learner.status()["counters"]["feedback"]
    (True, 20)
    """

    def __init__(self, model: nn.Module, reference: torch.Tensor, config: HealConfig = HealConfig(),
                 task: str | Task = "classification", reference_targets: torch.Tensor | None = None) -> None:
        validate_reference(reference)
        self.config = config
        self.model = model.eval()  # the learner's own copy: trained, then published
        self.device = model_device(model)
        raw = reference_outputs(model, reference)
        self.task = task if isinstance(task, Task) else Task.from_outputs(task, raw)
        self.parts = find_parts(model, self.task.outputs)
        self.learns = config.adapt and not self.parts.scripted  # else: labels are logged and watched only
        targets = self.task.check_targets(reference_targets, len(reference)) if reference_targets is not None else None
        full = reference.to(self.device)
        # large reference inputs are kept compact (learn/compact.py: 8-bit images as their bytes) and widened per
        # forward; the source view, which workers fit their own detectors on too, is read from `full`
        self._reference = compact(full)
        # inputs per forward pass here, measured before the feature tap hooks the head
        self._budget = ActivationBudget(model, config.learn.step_bytes, example=full[:1])
        self._range = (PlausibleRange(reference, config.input_range)
                       if reference.is_floating_point() and math.isfinite(config.input_range) else None)
        self._targets = targets
        self.input_shape, self.input_dtype = tuple(reference.shape[1:]), reference.dtype
        self._tap = FeatureTap(self.parts.head) if self.learns and self.parts.head is not None else None
        self.gradient: GradientLearner | None = None
        self.bayes: BayesianLastLayer | None = None
        self.bayes_off: str | None = "learning is off"
        try:
            ref_errors = self.task.errors(raw, targets) if targets is not None else None
            self.errors = Monitor(config.monitor, self.task, ON_FEEDBACK).calibrate(ReferenceView(errors=ref_errors))
            if self.learns:
                labelled = (self._reference, targets.to(self.device)) if targets is not None else None
                self.gradient = GradientLearner(model, config.learn, self.task, self.parts.head_name, labelled,
                                                seed=config.monitor.seed, budget=self._budget,
                                                input_dtype=self.input_dtype)
                noise = float(ref_errors.mean()) if ref_errors is not None and not self.task.is_classifier else 1.0
                self.bayes_off = self._bayes_unsupported(raw)
                if config.learn.bayes and self.bayes_off is None:
                    self.bayes = BayesianLastLayer(self.parts.head, self.task, config.learn.bayes_prior_var,
                                                   config.learn.bayes_forgetting, max(noise, 1e-6))
        except BaseException:
            self.close()
            raise
        # the source values of what learning can move (the chosen parameters, the output layer, the
        # buffers); the rest of the model stays the source's, and a copy of it was the model's size
        # again (45 MB of a 224x224 ResNet-18's learner, which learns its norms and last layer)
        self._source = self._movable_state()
        self.guard = Guard(config.guard, self.task)
        share = (torch.bincount(targets, minlength=self.task.num_classes).double() / len(targets)
                 if targets is not None and self.task.is_classifier else None)
        self.quarantine = (Quarantine(config.guard, share) if self.task.is_classifier and config.guard.quarantine
                           else None)
        # labels checked against the trusted labelled reference (classifiers with reference labels)
        self.concept = (ConceptWatch(config.guard) if self.learns and self.task.is_classifier and targets is not None
                        else None)
        g = config.guard
        self.source_check = (SourceCheck(g.source_window, g.source_significance, g.source_min_labels)
                             if self.learns and g.source_window else None)
        self.estimator = AccuracyEstimator()  # the serving side's ATC threshold, to check it on labels
        self.labelled = LabelledAccuracy()
        self._input_transform: tuple[torch.Tensor, torch.Tensor] | None = None  # serving's, from the context
        self._norm_layers = list(self.parts.batchnorms)
        self._norm_source = [(m.running_mean.clone(), m.running_var.clone()) for m in self._norm_layers]
        self._reset()
        self._refit_reference(inputs=full)
        # label-free detectors as the workers' are, fitted on the source view (no thresholds): what
        # fits each version's reference statistics for them
        self._rebaser = Monitor(config.monitor, self.task, LABEL_FREE).fit_reference(self._view)

    def _movable_state(self) -> dict[str, torch.Tensor]:
        """Copies of the tensors learning can move: the parameters the gradient learner trains,
        the output layer's (the Bayesian last layer's) and every buffer."""
        names = set(self.gradient.params) if self.gradient is not None else set()
        if self.parts.head is not None:
            names |= {f"{self.parts.head_name}.{p}" for p, _ in self.parts.head.named_parameters()}
        names |= {k for k, _ in self.model.named_buffers()}
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if k in names}

    def _reset(self) -> None:
        self.absorbed = 0  # sequence number of the last feedback-log row folded in
        self.version = 0  # the version the weights were last published or loaded as
        self.counters = {"feedback": 0, "quarantined": 0, "updates": 0, "rolled_back": 0, "publishes": 0,
                         "past_domain": 0, "taken_back": 0}
        self._dirty = False  # state changed since the last publish
        self._last_update: float | None = None
        self._delays: deque[float] = deque(maxlen=DELAYS_KEPT)  # label acknowledged -> published, seconds
        self._unpublished: list[float] = []  # acknowledgement times of labels absorbed since the last publish
        self._ages: deque[float] = deque(maxlen=DELAYS_KEPT)  # prediction served -> its label acknowledged, s
        # features of the traffic served now, read for judging old labels: (when read, oldest prediction
        # time among them, features); a burst of late labels reads them once, not per chunk
        self._current: tuple[float, float, torch.Tensor | None] = (-math.inf, 0.0, None)
        self._current_version: tuple = ()
        self._statuses: list[str] = []  # what became of each label of the last absorb (log statuses)
        self._released: list[int] = []  # log seqs of held labels the last absorb or approval released
        # learned labels that disagreed with what was served: (input key, given, served, log seq), one
        # quarantine window of them, so a class the quarantine starts holding can take them back
        self._disagreed: deque[tuple[int, int, int, int]] = deque(maxlen=self.config.guard.quarantine_window)
        self._taken_back: list[int] = []  # log seqs of learned labels the last absorb took back

    @torch.no_grad()
    def _bayes_unsupported(self, raw: torch.Tensor) -> str | None:
        """Why the Bayesian last layer cannot run on this model (None if it can): its update
        assumes the head's outputs are the model's outputs (no scaling or squashing after it)."""
        head = self.parts.head
        if head is None:
            return "no output nn.Linear layer"
        x = self._reference[:64]
        outs: list[torch.Tensor] = []
        seen: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().cpu()))
        try:
            for xb in self._budget.batches(x, self.input_dtype):
                outs.append(self.model(xb).cpu())
        finally:
            handle.remove()
            if self._tap is not None:
                self._tap.take()
        out = torch.cat(outs)
        head_out = torch.cat(seen) if len(seen) == len(outs) else None
        if head_out is None or head_out.numel() != out.numel() or not torch.allclose(head_out.reshape(out.shape), out,
                                                                                    rtol=1e-4, atol=1e-5):
            return (f"the model transforms the output of its last Linear ({self.parts.head_name}) before returning "
                    "it, so that layer's outputs are not the model's: gradient steps only")
        return None

    def close(self) -> None:
        if self._tap is not None:
            self._tap.remove()
            self._tap = None

    # ------------------------------------------------------------------ serving context
    @torch.no_grad()
    def use_context(self, context: dict | None) -> None:
        """Normalise as serving does: its adapted BatchNorm statistics, or the source ones; and take
        the transform serving applies to inputs (`as_served`)."""
        self._input_transform = self._checked_transform((context or {}).get("input"))
        norm = (context or {}).get("norm")
        for i, layer in enumerate(self._norm_layers):
            finite = bool(norm and norm.get("active") and i < len(norm["mean"])
                          and torch.isfinite(norm["mean"][i]).all() and torch.isfinite(norm["sq"][i]).all())
            if finite:  # a worker's non-finite statistics are not trained with (they reset there at once)
                mu, sq = norm["mean"][i].to(layer.running_mean), norm["sq"][i].to(layer.running_mean)
                layer.running_mean.copy_(mu)
                layer.running_var.copy_((sq - mu ** 2).clamp_min(layer.eps))
            else:
                layer.running_mean.copy_(self._norm_source[i][0])
                layer.running_var.copy_(self._norm_source[i][1])

    def _checked_transform(self, transform: dict | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Serving's input (scale, shift) when it fits one input and is finite, else None."""
        if not transform:
            return None
        scale, shift = transform.get("scale"), transform.get("shift")
        shape = (1,) + self.input_shape
        if not (isinstance(scale, torch.Tensor) and isinstance(shift, torch.Tensor)
                and tuple(scale.shape) == shape and tuple(shift.shape) == shape
                and bool(torch.isfinite(scale).all()) and bool(torch.isfinite(shift).all())):
            return None
        return scale.to(self.device), shift.to(self.device)

    def as_served(self, x: torch.Tensor) -> torch.Tensor:
        """x as the served model is given it now: through serving's input transform (a polarity fix,
        input statistics) when one is on. Labelled inputs are kept raw and trained and judged
        through the transform current at each update, so an update learns what serving asks of the
        model now; trained on raw inputs, it learned to read mirrored digits while serving
        un-mirrored them, and labels made the served error worse than no labels (issue 27)."""
        t = self._input_transform
        if t is None or not x.is_floating_point() or tuple(x.shape[1:]) != self.input_shape:
            return x
        return x * t[0].to(x.dtype) + t[1].to(x.dtype)

    def _at_source_norms(self) -> bool:
        return all(torch.equal(m.running_mean, mu) and torch.equal(m.running_var, var)
                   for m, (mu, var) in zip(self._norm_layers, self._norm_source))

    @contextmanager
    def _source_norms(self) -> Iterator[None]:
        """BatchNorm layers on their source statistics inside the block, as they were after it (the
        input transform too)."""
        transform = self._input_transform
        if not self._norm_layers:
            yield
            return
        saved = [(m.running_mean.clone(), m.running_var.clone()) for m in self._norm_layers]
        self.use_context(None)
        try:
            yield
        finally:
            self._input_transform = transform
            with torch.no_grad():
                for layer, (mu, var) in zip(self._norm_layers, saved):
                    layer.running_mean.copy_(mu)
                    layer.running_var.copy_(var)

    @torch.no_grad()
    def _source_answers(self, x: torch.Tensor) -> torch.Tensor:
        """The classes the source weights give x with confidence (-1 where unsure): a stand-in for
        the reference where it cannot speak, that learning, poisoned or not, never moves."""
        # the source state (weights and BatchNorm statistics) for this call only: nothing copied in or out
        probs = torch.cat([torch.func.functional_call(self.model, self._source, (xb,)).softmax(1).cpu()
                           for xb in self._budget.batches(x, device=self.device)])
        conf, cls = probs.max(1)
        return torch.where(conf >= self.config.guard.quarantine_confidence, cls, torch.full_like(cls, -1))

    # ------------------------------------------------------------------ labels in
    def check_input(self, x) -> torch.Tensor:
        """Inputs validated as serving validates them; ValueError naming the problem."""
        return check_inputs(x, self.input_shape, self.input_dtype, self.device, self.config.max_batch)

    @torch.no_grad()
    def served(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the current weights serve for x: (labels, confidence) or (values, None)."""
        return self.task.served(torch.cat([self.model(xb).cpu()
                                           for xb in self._budget.batches(x, device=self.device)]))

    def absorb(self, x: torch.Tensor, y: torch.Tensor, served: torch.Tensor | None = None,
               confidence: torch.Tensor | None = None, seqs: list[int] | None = None,
               times: list[float] | None = None, context: dict | None = None) -> torch.Tensor:
        """Take labelled pairs in log order: error detector, quarantine, holdout, replay buffer.

        `served`/`confidence`: what was served (from the prediction record; -1 / NaN where unknown),
        recomputed with the current weights when not given. Returns the mask of labels held back.
        """
        y = self.task.check_targets(y, len(x))
        self._released, self._taken_back = [], []
        self.use_context(context)
        if served is None or (self.task.is_classifier and confidence is None):
            served, confidence = self.served(self.as_served(x.to(self.device)))
        if self.task.is_classifier:
            known = served >= 0
            self.errors.observe_errors(self.task.errors(served[known], y[known], served=True))
            seen = known & ~confidence.isnan()
            if seen.any():
                self.labelled.add(served[seen] == y[seen], self.estimator.predicts_correct(confidence[seen]),
                                  self.estimator.calibrated_correct(confidence[seen]))
        else:
            self.errors.observe_errors(self.task.errors(served, y, served=True))
        held = torch.zeros(len(y), dtype=torch.bool)
        drifted = bool((context or {}).get("inputs_drifted"))
        holding = set(self.quarantine.classes) if self.quarantine is not None else set()
        raised = self.concept.raised() if self.concept is not None else set()
        if self.quarantine is not None and self.learns:
            held = self.quarantine.screen(served, y, confidence.nan_to_num(0.0), drifted)
        statuses = [QUARANTINED if h else LEARNED for h in held.tolist()]
        if self._range is not None:
            # inputs no reference speaks for (beyond the plausible range) are logged, never learned
            implausible = ~self._range.check(x).cpu()
            statuses = [HELD if bad and st == LEARNED else st for st, bad in zip(statuses, implausible.tolist())]
            held = held | implausible
        if self.concept is not None:
            # each label is judged on its own input, read with the statistics the reference was read
            # with: serving's adapted ones follow the traffic, which an attacker can drift (issue 26 B)
            with self._source_norms():
                feats = self._features_of(x)
            contradicts = self.concept.screen(feats, y, x, seqs, times, skip=held,
                                              served=self._source_answers(x) if self.concept.raised() else None)
            if self.gradient is not None:
                self.gradient.concept_moved(self.concept.moved)
            statuses = [HELD if c and st == LEARNED else st for st, c in zip(statuses, contradicts.tolist())]
            held = held | contradicts
            self._learn_released(self.concept.release(
                frozenset(self.quarantine.classes) if self.quarantine is not None else frozenset()))
        self._statuses = statuses
        if self.source_check is not None and not bool(held.all()):
            self._check_against_source(x[~held], y[~held])
        if self.learns:
            train_x, train_y = self.guard.admit(x, y, skip=held)
            if len(train_y):
                self.gradient.add(train_x, train_y)
            if self.task.is_classifier:
                self._take_back(x, y, served, statuses, seqs, holding, raised)
        self.counters["feedback"] += len(y)
        self.counters["quarantined"] += int(held.sum())
        if seqs:
            self.absorbed = max(self.absorbed, int(seqs[-1]))
        self._unpublished += list(times or [])
        self._dirty = True
        return held

    @torch.no_grad()
    def _check_against_source(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """New labels, before anything learns from them, judge the learned weights against the
        source weights under serving's statistics (source_check.py); worse, they go back."""
        learned = {k: v for k, v in self.model.named_parameters()
                   if k in self._source and not torch.equal(v, self._source[k])}
        if not learned:
            return
        source = {k: self._source[k] for k in learned}
        xs = self.as_served(x.to(self.device))
        losses = []
        for params in (None, source):
            raw = torch.cat([(self.model(xb) if params is None else
                              torch.func.functional_call(self.model, params, (xb,))).cpu()
                             for xb in self._budget.batches(xs)])
            losses.append(self.task.loss(raw, y.to(raw.device), reduction="none").reshape(len(y), -1).mean(1))
        if self._tap is not None:
            self._tap.take()  # these forwards are no update's features
        if not self.source_check.observe(*losses):
            return
        log.warning("the learned weights served the last %d labels worse than the source weights would: "
                    "back to the source weights (fallback %d)", self.config.guard.source_window,
                    self.source_check.fallbacks)
        self.gradient.fall_back(self.config.learn.newest_window)
        if self.bayes:
            self.bayes.reset()
        self.counters["fallbacks"] = self.counters.get("fallbacks", 0) + 1
        self._dirty = True
        self._refit_reference()

    def _take_back(self, x: torch.Tensor, y: torch.Tensor, served: torch.Tensor, statuses: list[str],
                   seqs: list[int] | None, holding: set[int], raised: set[tuple[int, int]]) -> None:
        """Labels learned before a screen had seen enough to tell are taken back when it tells:
        into a class the quarantine starts holding (a burst or a broken labeller into it), or of a
        pair (served, given) the concept watch starts suspecting. A broken labeller's first dozen
        labels, replayed and judged by ever after, cost 9 points on rotated digits; a poisoned
        input learned before its pair was suspected is served as the attacker's class from then
        on, so its repeats no longer contradict anything. Of the labels learned within the
        quarantine's window that disagreed with what was served, those leave the replay buffer
        and the holdout, and the log marks them quarantined. What updates already did with them
        stays: later updates, with replay and the reference, pull it back."""
        for i, (st, s, g) in enumerate(zip(statuses, served.tolist(), y.tolist())):
            if st == LEARNED and 0 <= s != g:
                self._disagreed.append((_input_key(x[i]), int(g), int(s), seqs[i] if seqs else -1))
        classes = set(self.quarantine.classes) - holding if self.quarantine is not None else set()
        pairs = self.concept.raised() - raised if self.concept is not None else set()
        taken = [row for row in self._disagreed if row[1] in classes or (row[2], row[1]) in pairs]
        if not taken:
            return
        keys = {(k, g) for k, g, _, _ in taken}
        match = lambda xi, yi: yi.numel() == 1 and (_input_key(xi), int(yi)) in keys  # noqa: E731
        removed = self.gradient.buffer.drop(match) + self.guard.drop(match)
        kept = [row for row in self._disagreed if row not in taken]
        self._disagreed.clear()
        self._disagreed.extend(kept)
        self._taken_back += [q for _, _, _, q in taken if q >= 0]
        self.counters["taken_back"] += len(taken)
        log.warning("labels into %s and of pairs %s are held now: %d learned ones taken back (%d pairs removed "
                    "from replay and the holdout)", sorted(classes), sorted(pairs), len(taken), removed)

    def absorb_entries(self, entries: Entries, context: dict | None = None, log_: FeedbackLog | None = None,
                       current: Callable[[], tuple[torch.Tensor, list[float]] | None] | None = None) -> torch.Tensor:
        """Absorb feedback-log rows (in order) and record in the log what became of each; rows an
        operator discarded are passed over. `current`: the newest predictions' inputs and times
        (the prediction record's `newest`), read only when a label answers a prediction older than
        `past_age_s`: such labels are learned only if their inputs look like that traffic."""
        self._ages.extend(max(t - p, 0.0) for t, p in zip(entries.time, entries.predicted) if p is not None)
        keep = [st != DISCARDED for st in entries.status]
        past = self._past_domain(entries, current) if self.learns else [False] * len(keep)
        if any(past) and log_ is not None:
            log_.set_status([s for s, p in zip(entries.seq, past) if p], PAST)
        keep = [k and not p for k, p in zip(keep, past)]
        if not all(keep):
            self.absorbed = max(self.absorbed, int(entries.seq[-1]))
            if not any(keep):
                return torch.ones(len(keep), dtype=torch.bool)
            entries = entries.subset([i for i, k in enumerate(keep) if k])
        y = decode_targets(entries.target, self.task.is_classifier)
        served, confidence = self._decode_served(entries)
        held = self.absorb(entries.x.to(self.device), y, served, confidence, seqs=entries.seq, times=entries.time,
                           context=context)
        if log_ is not None:
            for status in (LEARNED, HELD, QUARANTINED):
                log_.set_status([s for s, st in zip(entries.seq, self._statuses) if st == status], status)
            log_.set_status(self._released, LEARNED)  # held earlier, released by the concept policy now
            log_.set_status(self._taken_back, QUARANTINED)  # learned earlier, taken back now
        return held

    def _past_domain(self, entries: Entries, current) -> list[bool]:
        """Which rows answer predictions of a domain the traffic has left (see label_age.py)."""
        cfg = self.config.learn
        cutoff = time.time() - cfg.past_age_s
        old = [i for i, p in enumerate(entries.predicted) if p is not None and p < cutoff]
        if not old or cfg.past_alpha <= 0 or current is None:
            return [False] * len(entries.seq)
        at, since, now_feats = self._current
        weights = (self.version, self.counters["updates"], self.counters["rolled_back"])  # features follow them
        if time.monotonic() - at > CURRENT_TTL_S or self._current_version != weights:
            newest = current()
            if newest is None:
                return [False] * len(entries.seq)
            with self._source_norms():
                now_feats = self._features_of(newest[0])
            since = min(newest[1])
            self._current, self._current_version = (time.monotonic(), since, now_feats), weights
        old = [i for i in old if entries.predicted[i] < since]  # not itself part of that traffic
        if not old:
            return [False] * len(entries.seq)
        with self._source_norms():
            feats = self._features_of(entries.x[old])
        mask = label_age.past_runs([entries.predicted[i] for i in old], feats, now_feats, cfg.past_alpha)
        past = [False] * len(entries.seq)
        for i, p in zip(old, mask.tolist()):
            past[i] = p
        self.counters["past_domain"] += int(mask.sum())
        return past

    def _decode_served(self, entries: Entries) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What was served per row (from the prediction record); None when any row lacks it."""
        import json

        if any(s is None for s in entries.served):
            return None, None
        values = [json.loads(s) for s in entries.served]
        if self.task.is_classifier:
            conf = torch.tensor([float("nan") if c is None else c for c in entries.confidence], dtype=torch.float64)
            return torch.tensor([int(v) for v in values], dtype=torch.long), conf
        return torch.tensor([v if isinstance(v, list) else [v] for v in values], dtype=torch.float32), None

    # ------------------------------------------------------------------ updates
    @property
    def update_due(self) -> bool:
        return (self.learns and self.gradient.pending >= self.config.learn.update_every
                and self.guard.ready)

    def update(self, context: dict | None = None) -> UpdateResult:
        """One guarded update from the buffer (Bayesian last layer on the new pairs, then gradient
        steps on a replay minibatch); rolled back if the holdout loss rises."""
        if not self.update_due:
            return UpdateResult()
        self.use_context(context)
        before = self.guard.evaluate(self.model, self.as_served, self._budget)
        saved = self.gradient.copy_params()
        bayes_saved = self.bayes.state_dict() if self.bayes else None
        if self.bayes:
            new_x, new_y = self.gradient.newest()
            new_x = self.as_served(new_x.to(self.device))
            feats = []
            with torch.no_grad():  # in forwards within step_bytes: 64 224x224 images at once held ~600 MB
                for xb in self._budget.batches(new_x):
                    self.model(xb)
                    feats.append(self._tap.take())
            self.bayes.update(torch.cat(feats), new_y)
        recall_before = self._reference_recall()
        # the reference rows as their own forward only where serving's statistics are not the source's
        self.gradient.step(self.as_served, None if self._at_source_norms() else self._source_norms)
        harms_reference = self._reference_harmed(recall_before)
        if not self.guard.judge(before, self.guard.evaluate(self.model, self.as_served, self._budget)) \
                or harms_reference:
            self.gradient.restore_params(saved)
            if self.bayes:
                self.bayes.load_state_dict(bayes_saved)
            self.counters["rolled_back"] += 1
            self.counters["reference_rejected"] = self.counters.get("reference_rejected", 0) + harms_reference
            return UpdateResult(rolled_back=True)
        self.counters["updates"] += 1
        self._last_update = time.time()
        self._dirty = True
        self._refit_reference()
        return UpdateResult(updated=True)

    # ------------------------------------------------------------------ the trusted reference
    @torch.no_grad()
    def _features_of(self, x: torch.Tensor) -> torch.Tensor:
        """Features (B, F) of x through the current weights: the head's input, or pooled inputs."""
        out = []
        for xb in self._budget.batches(x, self.input_dtype, self.device):
            self.model(xb)
            f = self._tap.take() if self._tap is not None else None
            out.append(f.to("cpu", torch.float64) if f is not None else pool_inputs(xb))
        return torch.cat(out)

    @torch.no_grad()
    def _refit_reference(self, view: ReferenceView | None = None, inputs: torch.Tensor | None = None) -> None:
        """Read the labelled reference through the current weights, once per version: the view
        workers install, the concept watch and the accuracy estimate all come from that one pass.

        The view is kept with the version it was read for: later contexts (a rolled-back update
        normalises with newer serving statistics) must not change what a snapshot of the same
        weights publishes, or a restored healer's detectors would be rebased differently from the
        original's. `view`: a restored version's, as it was read when the version was made;
        `inputs`: the reference to read, when not the one kept (at construction: at full precision)."""
        self._view = view if view is not None else self._read_reference(inputs)
        if self.concept is not None:
            feats = self._view.features if view is None and self._at_source_norms() else None
            if feats is None:
                with self._source_norms():
                    feats = self._features_of(self._reference)
            self.concept.fit(feats, self._targets)
        if self.task.is_classifier and self._targets is not None:
            conf, pred = self._view.probs.max(1)
            self.estimator.calibrate(conf, pred == self._targets)

    @torch.no_grad()
    def _reference_recall(self) -> torch.Tensor | None:
        """Per-class recall (C,) on the labelled reference, as approved concept changes label it."""
        if self.concept is None:
            return None
        labels = self.concept.reference_labels
        # read with the statistics the reference was read with: serving's adapted ones describe the
        # drifted traffic, and clean inputs read through them measure neither domain (a weight change
        # that cost clean inputs 80 points of a class's recall passed, another was refused on noise)
        with self._source_norms():
            pred = torch.cat([self.model(xb).argmax(1).cpu()
                              for xb in self._budget.batches(self._reference, self.input_dtype)])
        hits = torch.bincount(labels[pred == labels], minlength=self.task.num_classes).double()
        total = torch.bincount(labels, minlength=self.task.num_classes).double()
        return torch.where(total >= 5, hits / total.clamp_min(1), torch.full_like(total, float("nan")))

    def _reference_harmed(self, before: torch.Tensor | None) -> bool:
        """Whether the update lowered some class's recall on the trusted reference beyond the limit."""
        if before is None:
            return False
        drop = (before - self._reference_recall()).nan_to_num(0.0)
        moved = sorted(self.concept.moved) if self.concept is not None else []
        if moved:  # classes whose meaning feedback changed: their old recall is no longer the yardstick
            drop[moved] = 0.0
        return float(drop.max()) > self.config.guard.reference_check_drop

    # ------------------------------------------------------------------ decisions on held labels
    def approve(self, source: int, target: int) -> list[int]:
        """An operator approves the relabelling source -> target: its held labels are learned (their
        log seqs returned), later ones too, and the reference's class-`source` inputs now mean `target`."""
        released = self.concept.approve(source, target) if self.concept else []
        if self.gradient is not None and self.concept is not None:
            self.gradient.relabel_reference(self.concept.reference_labels)
        self._learn_released(released)
        self._dirty = True
        return self._released

    def _learn_released(self, released: list[tuple]) -> None:
        """Learn held labels the concept watch released, (seq, x, label, time) each; their log seqs
        are kept in `_released` for the caller to mark learned."""
        self._released = [r[0] for r in released if r[0] >= 0]
        if released and self.learns:
            x = torch.stack([widen(r[1], self.input_dtype) for r in released]).to(self.device)  # kept compact
            y = torch.tensor([r[2] for r in released], dtype=torch.long)
            train_x, train_y = self.guard.admit(x, y)
            if len(train_y):
                self.gradient.add(train_x, train_y)

    def discard(self, source: int, target: int) -> tuple[list[int], int | None]:
        """An operator discards the relabelling: (log seqs of its held labels, dropped; the log seq
        of its first label if some were learned, so the caller restores a version from before it)."""
        if self.concept is None:
            return [], None
        learned = self.concept.learned_of(source, target)
        pair = next(p for p in self.concept.suspected if p["pair"] == [source, target]) \
            if any(p["pair"] == [source, target] for p in self.concept.suspected) else None
        dropped = self.concept.discard(source, target)
        self._dirty = True
        return dropped, (pair["since_seq"] if pair and learned else None)

    # ------------------------------------------------------------------ versions out
    @torch.no_grad()
    def _read_reference(self, inputs: torch.Tensor | None = None) -> ReferenceView:
        x = self._reference if inputs is None else inputs
        raws, feats = [], []
        for xb in self._budget.batches(x, self.input_dtype):
            raws.append(self.model(xb).cpu())
            f = self._tap.take() if self._tap is not None else (pool_inputs(xb) if xb.is_floating_point() else None)
            feats.append(None if f is None else f.to("cpu", torch.float64))
        raw = torch.cat(raws)
        features = None if any(f is None for f in feats) else torch.cat(feats)
        return ReferenceView(probs=self.task.probs(raw), features=features,
                             values=None if self.task.is_classifier else self.task.values(raw))

    def reference_view(self) -> ReferenceView:
        """The reference through the current version's weights (this process's; workers install
        the statistics fitted on it, `rebase_values`)."""
        return self._view

    def rebase_values(self) -> dict:
        """What a worker installs so that this version's weights do not read as drift: each label-free
        detector's reference statistics (fitted here along the axes both calibrated on the source
        view) and the reference's confidences and predicted classes (its accuracy estimate's
        calibration). A few KB, where the view itself held every reference input's features."""
        return rebase_values(self._rebaser, self._view)

    @property
    def dirty(self) -> bool:
        return self._dirty

    def _changed_weights(self) -> dict[str, torch.Tensor]:
        """The parameters that differ from the source model's: all a worker needs besides the model
        it loaded (a learner that trains the last layer publishes the last layer, not the model)."""
        return {k: v.detach().cpu().clone() for k, v in self.model.named_parameters()
                if k in self._source and not torch.equal(v.detach(), self._source[k].to(v.device))}

    def published(self, version: int) -> Published:
        """What a worker installs for `version` (the changed weights and their reference view)."""
        return Published(version=version, weights=self._changed_weights(), rebase=self.rebase_values())

    def snapshot(self, serving_state: dict | None = None) -> tuple[dict, dict, dict]:
        """(published, meta, private) of a version: what workers install (the weights that differ
        from the source and the reference statistics fitted with them), and the private record only
        a learner reads (its whole state, the reference view it restores without re-reading and,
        in one process, the serving state)."""
        ref = self.reference_view()
        published = {"format": SNAPSHOT_FORMAT, "task": self.task.kind.value, "weights": self._changed_weights(),
                     "rebase": self.rebase_values()}
        private = {"format": SNAPSHOT_FORMAT, "learner": self.state_dict(), "serving": serving_state,
                   "reference": {k: v for k, v in ref.__dict__.items() if v is not None}}
        meta = {"feedback_seq": self.absorbed, "based_on": self.version, "validation_error": self.guard.last_error,
                "task": self.task.kind.value, "updates": self.counters["updates"]}
        return published, meta, private

    def mark_published(self, version: int, when: float | None = None) -> None:
        """Record a publish: the version, and the delay of every label it newly absorbed."""
        when = time.time() if when is None else when
        self._delays.extend(max(when - t, 0.0) for t in self._unpublished)
        self._unpublished = []
        self.version = version
        self.counters["publishes"] += 1
        self._dirty = False

    def delay_percentiles(self) -> dict:
        """Label acknowledged -> weights published, over the newest labels."""
        if not self._delays:
            return {"p50_s": None, "p99_s": None, "labels": 0}
        d = torch.tensor(list(self._delays), dtype=torch.float64)
        return {"p50_s": round(float(d.quantile(0.5)), 3), "p99_s": round(float(d.quantile(0.99)), 3),
                "labels": len(d)}

    def age_percentiles(self) -> dict:
        """Prediction served -> its label acknowledged (labels by id), over the newest labels: how
        late labels come, and so how far back the prediction record must reach."""
        if not self._ages:
            return {"p50_s": None, "p90_s": None, "p99_s": None, "max_s": None, "labels": 0}
        d = torch.tensor(list(self._ages), dtype=torch.float64)
        q = {f"p{k}_s": round(float(d.quantile(k / 100)), 3) for k in (50, 90, 99)}
        return {**q, "max_s": round(float(d.max()), 3), "labels": len(d)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything a learner restarts from: weights, buffers, holdout, quarantine, log position."""
        return {
            # what learning can move; the rest is the source model's, which a learner starts from
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items() if k in self._source},
            "gradient": self.gradient.state_dict() if self.gradient else None,
            "bayes": self.bayes.state_dict() if self.bayes else None,
            "guard": self.guard.state_dict(),
            "quarantine": self.quarantine.state_dict() if self.quarantine else None,
            "concept": self.concept.state_dict() if self.concept else None,
            "source_check": self.source_check.state_dict() if self.source_check else None,
            "labelled": self.labelled.state_dict(),
            "errors": self.errors.state_dict(),
            "absorbed": self.absorbed,
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict, reference: ReferenceView | None = None) -> None:
        """Restore a state; on any error the learner is left exactly as it was. `reference`: the
        version's published view (`reference_of(snapshot)`); without it the reference is re-read."""
        backup, view, source = self.state_dict(), self._view, dict(self._source)
        try:
            self._apply(state, reference)
        except Exception:
            self.model.load_state_dict({k: v for k, v in self._source.items() if k not in source}, strict=False)
            self._source = source
            self._apply(backup, view)
            raise

    def _apply(self, state: dict, reference: ReferenceView | None = None) -> None:
        weights, current = state["model"], self.model.state_dict()
        unknown = sorted(set(weights) - set(current))
        if unknown:
            raise ValueError(f"the learner state holds tensors this model lacks: {unknown[:5]}")
        # a state saved whole (before only what learning moves was kept, or under other settings)
        # may move tensors outside the source copy: their source values are kept from now on, so a
        # reset and what is published still know them (untouched here, they are the source's)
        for k, v in weights.items():
            if k not in self._source and not torch.equal(v.to(current[k].device), current[k]):
                self._source[k] = current[k].detach().clone()
        self.model.load_state_dict(weights, strict=False)
        if self.gradient and state.get("gradient") is not None:
            self.gradient.load_state_dict(state["gradient"])
        if self.bayes and state.get("bayes") is not None:
            self.bayes.load_state_dict(state["bayes"])
        self.guard.load_state_dict(state["guard"])
        if self.quarantine and state.get("quarantine") is not None:
            self.quarantine.load_state_dict(state["quarantine"])
        if state.get("labelled") is not None:
            self.labelled.load_state_dict(state["labelled"])
        if self.source_check and state.get("source_check") is not None:
            self.source_check.load_state_dict(state["source_check"])
        if self.concept and state.get("concept") is not None:
            self.concept.load_state_dict(state["concept"])
            if self.gradient is not None:
                self.gradient.relabel_reference(self.concept.reference_labels)
                self.gradient.concept_moved(self.concept.moved)
        self.errors.load_state_dict(state["errors"])
        self.absorbed = int(state["absorbed"])
        self.counters = {**self.counters, **state["counters"]}
        self._refit_reference(reference)

    def restore_before(self, seq: int, store) -> int:
        """Go back to the newest published version that absorbed no log row from `seq` on (the
        source model if none is kept); returns that version (0: the source). Counters and the
        operators' decisions stay; the caller then lets it re-read the log from there."""
        decisions = self.concept.decisions() if self.concept else None
        counters = dict(self.counters)
        for version in reversed(store.versions() if store is not None else []):
            try:
                state, meta = store.load(version)
                private = store.load_private(version) if int(meta.get("feedback_seq", 0)) < seq else None
            except (ValueError, OSError):
                continue
            if private is not None:
                self.load_state_dict(private["learner"], reference_of(private, state))
                break
        else:
            version = 0
            self.reset()
        self.counters = counters
        if decisions is not None:  # the decisions taken since stay taken
            self.concept.reapply(decisions)
        self._dirty = True
        return version

    def reset(self) -> None:
        """Back to the source model; forget buffers, holdout, quarantine and the log position."""
        self.model.load_state_dict(self._source, strict=False)
        if self.gradient:
            self.gradient.reset()
        self.guard.reset()
        if self.quarantine:
            self.quarantine.reset()
        if self.concept:
            self.concept.reset()
        if self.bayes:
            self.bayes.reset()
        if self.source_check:
            self.source_check.reset()
        self.errors.reset()
        if self.gradient is not None and self._targets is not None:
            self.gradient.relabel_reference(self._targets)
        self._reset()
        self._refit_reference()
        self._dirty = True

    def status(self) -> dict:
        return {
            "version": self.version,
            "absorbed": self.absorbed,
            "unpublished": self._dirty,  # absorbed or learned since the last published version
            "counters": dict(self.counters),
            "errors": self.errors.state.as_dict(),
            "guard": self.guard.status(),
            "quarantine": self.quarantine.status() if self.quarantine else None,
            "concept": self.concept.status() if self.concept else None,
            "source_check": self.source_check.status() if self.source_check else None,
            "accuracy": self.labelled.summary(),
            "learner": ({"buffer": len(self.gradient.buffer), "params": len(self.gradient.params),
                         "pending": self.gradient.pending,
                         "bayes": self.bayes.status() if self.bayes else {"off": self.bayes_off or "disabled"},
                         "last_update": self._last_update} if self.gradient
                        else {"learning": "off: monitor-only, labels are logged and watched"}),
            "label_delay": self.delay_percentiles(),
            "label_age": self.age_percentiles(),
        }
