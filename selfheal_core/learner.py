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
import time
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from selfheal_core.config import HealConfig
from selfheal_core.guard import Guard
from selfheal_core.learn import BayesianLastLayer, GradientLearner
from selfheal_core.model_parts import FeatureTap, find_parts, pool_inputs
from selfheal_core.monitor import ON_FEEDBACK, Monitor, ReferenceView
from selfheal_core.quarantine import Quarantine
from selfheal_core.serving import (Published, check_inputs, model_device, reference_outputs,
                                   validate_reference)
from selfheal_core.state import clone_state
from selfheal_core.storage.base import HELD, LEARNED, QUARANTINED, Entries, FeedbackLog, decode_targets
from selfheal_core.task import Task

log = logging.getLogger(__name__)

DELAYS_KEPT = 1_000  # label-to-weights delays kept for percentiles
SNAPSHOT_FORMAT = 3


def published_from_snapshot(state: dict, meta: dict) -> Published:
    """What a worker installs from a stored version; ValueError for a format it cannot read."""
    if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"unsupported snapshot format {state.get('format') if isinstance(state, dict) else None} "
                         f"(this selfheal reads {SNAPSHOT_FORMAT})")
    return Published(version=int(meta["version"]), weights=state["weights"],
                     reference=ReferenceView(**state["reference"]) if state.get("reference") else None)


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
        self._reference = reference.to(self.device)
        self._targets = targets
        self.input_shape, self.input_dtype = tuple(reference.shape[1:]), reference.dtype
        self._source = clone_state(model.state_dict())
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
                                                seed=config.monitor.seed)
                noise = float(ref_errors.mean()) if ref_errors is not None and not self.task.is_classifier else 1.0
                self.bayes_off = self._bayes_unsupported(raw)
                if config.learn.bayes and self.bayes_off is None:
                    self.bayes = BayesianLastLayer(self.parts.head, self.task, config.learn.bayes_prior_var,
                                                   config.learn.bayes_forgetting, max(noise, 1e-6))
        except BaseException:
            self.close()
            raise
        self.guard = Guard(config.guard, self.task)
        self.quarantine = Quarantine(config.guard) if self.task.is_classifier and config.guard.quarantine else None
        self._norm_layers = list(self.parts.batchnorms)
        self._norm_source = [(m.running_mean.clone(), m.running_var.clone()) for m in self._norm_layers]
        self._reset()

    def _reset(self) -> None:
        self.absorbed = 0  # sequence number of the last feedback-log row folded in
        self.version = 0  # the version the weights were last published or loaded as
        self.counters = {"feedback": 0, "quarantined": 0, "updates": 0, "rolled_back": 0, "publishes": 0}
        self._dirty = False  # state changed since the last publish
        self._last_update: float | None = None
        self._delays: deque[float] = deque(maxlen=DELAYS_KEPT)  # label acknowledged -> published, seconds
        self._unpublished: list[float] = []  # acknowledgement times of labels absorbed since the last publish

    @torch.no_grad()
    def _bayes_unsupported(self, raw: torch.Tensor) -> str | None:
        """Why the Bayesian last layer cannot run on this model (None if it can): its update
        assumes the head's outputs are the model's outputs (no scaling or squashing after it)."""
        head = self.parts.head
        if head is None:
            return "no output nn.Linear layer"
        seen: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().cpu()))
        try:
            out = self.model(self._reference[:64]).cpu()
        finally:
            handle.remove()
            if self._tap is not None:
                self._tap.take()
        if not seen or seen[-1].numel() != out.numel() or not torch.allclose(seen[-1].reshape(out.shape), out,
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
        """Normalise as serving does: its adapted BatchNorm statistics, or the source ones."""
        norm = (context or {}).get("norm")
        for i, layer in enumerate(self._norm_layers):
            if norm and norm.get("active") and i < len(norm["mean"]):
                mu, sq = norm["mean"][i].to(layer.running_mean), norm["sq"][i].to(layer.running_mean)
                layer.running_mean.copy_(mu)
                layer.running_var.copy_((sq - mu ** 2).clamp_min(layer.eps))
            else:
                layer.running_mean.copy_(self._norm_source[i][0])
                layer.running_var.copy_(self._norm_source[i][1])

    # ------------------------------------------------------------------ labels in
    def check_input(self, x) -> torch.Tensor:
        """Inputs validated as serving validates them; ValueError naming the problem."""
        return check_inputs(x, self.input_shape, self.input_dtype, self.device, self.config.max_batch)

    @torch.no_grad()
    def served(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the current weights serve for x: (labels, confidence) or (values, None)."""
        return self.task.served(self.model(x.to(self.device)).cpu())

    def absorb(self, x: torch.Tensor, y: torch.Tensor, served: torch.Tensor | None = None,
               confidence: torch.Tensor | None = None, seqs: list[int] | None = None,
               times: list[float] | None = None, context: dict | None = None) -> torch.Tensor:
        """Take labelled pairs in log order: error detector, quarantine, holdout, replay buffer.

        `served`/`confidence`: what was served (from the prediction record; -1 / NaN where unknown),
        recomputed with the current weights when not given. Returns the mask of labels held back.
        """
        y = self.task.check_targets(y, len(x))
        self.use_context(context)
        if served is None or (self.task.is_classifier and confidence is None):
            served, confidence = self.served(x)
        if self.task.is_classifier:
            known = served >= 0
            self.errors.observe_errors(self.task.errors(served[known], y[known], served=True))
        else:
            self.errors.observe_errors(self.task.errors(served, y, served=True))
        held = torch.zeros(len(y), dtype=torch.bool)
        if self.quarantine is not None and self.learns:
            drifted = bool((context or {}).get("inputs_drifted"))
            held = self.quarantine.screen(served, y, confidence.nan_to_num(0.0), drifted)
        if self.learns:
            train_x, train_y = self.guard.admit(x, y, skip=held)
            if len(train_y):
                self.gradient.add(train_x, train_y)
        self.counters["feedback"] += len(y)
        self.counters["quarantined"] += int(held.sum())
        if seqs:
            self.absorbed = max(self.absorbed, int(seqs[-1]))
        self._unpublished += list(times or [])
        self._dirty = True
        return held

    def absorb_entries(self, entries: Entries, context: dict | None = None, log_: FeedbackLog | None = None) -> torch.Tensor:
        """Absorb feedback-log rows (in order) and record in the log what became of each."""
        y = decode_targets(entries.target, self.task.is_classifier)
        served, confidence = self._decode_served(entries)
        held = self.absorb(entries.x.to(self.device), y, served, confidence, seqs=entries.seq, times=entries.time,
                           context=context)
        if log_ is not None:
            held_seqs = [s for s, h in zip(entries.seq, held.tolist()) if h]
            log_.set_status([s for s, h in zip(entries.seq, held.tolist()) if not h], LEARNED)
            log_.set_status(held_seqs, QUARANTINED if self.quarantine and self.quarantine.status()["active"] else HELD)
        return held

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
        before = self.guard.evaluate(self.model)
        saved = self.gradient.copy_params()
        bayes_saved = self.bayes.state_dict() if self.bayes else None
        if self.bayes:
            new_x, new_y = self.gradient.newest()
            with torch.no_grad():
                self.model(new_x.to(self.device))
            self.bayes.update(self._tap.take(), new_y)
        self.gradient.step()
        if not self.guard.judge(before, self.guard.evaluate(self.model)):
            self.gradient.restore_params(saved)
            if self.bayes:
                self.bayes.load_state_dict(bayes_saved)
            self.counters["rolled_back"] += 1
            return UpdateResult(rolled_back=True)
        self.counters["updates"] += 1
        self._last_update = time.time()
        self._dirty = True
        return UpdateResult(updated=True)

    # ------------------------------------------------------------------ versions out
    @torch.no_grad()
    def reference_view(self) -> ReferenceView:
        """The reference through the current weights: what workers' detectors re-read."""
        raws, feats = [], []
        for i in range(0, len(self._reference), 256):
            xb = self._reference[i:i + 256]
            raws.append(self.model(xb).cpu())
            f = self._tap.take() if self._tap is not None else (pool_inputs(xb) if xb.is_floating_point() else None)
            feats.append(None if f is None else f.to("cpu", torch.float64))
        raw = torch.cat(raws)
        features = None if any(f is None for f in feats) else torch.cat(feats)
        return ReferenceView(probs=self.task.probs(raw), features=features,
                             values=None if self.task.is_classifier else self.task.values(raw))

    @property
    def dirty(self) -> bool:
        return self._dirty

    def published(self, version: int) -> Published:
        """What a worker installs for `version` (the weights and their reference view)."""
        weights = {k: v.detach().cpu().clone() for k, v in self.model.named_parameters()}
        return Published(version=version, weights=weights, reference=self.reference_view())

    def snapshot(self, serving_state: dict | None = None) -> tuple[dict, dict]:
        """(state, meta) of a version to publish: the learner's state, what workers install, and
        (one process only) the serving state."""
        ref = self.reference_view()
        state = {"format": SNAPSHOT_FORMAT, "task": self.task.kind.value, "learner": self.state_dict(),
                 "weights": {k: v.detach().cpu().clone() for k, v in self.model.named_parameters()},
                 "reference": {k: v for k, v in ref.__dict__.items() if v is not None},
                 "serving": serving_state}
        meta = {"feedback_seq": self.absorbed, "based_on": self.version, "validation_error": self.guard.last_error,
                "task": self.task.kind.value, "updates": self.counters["updates"]}
        return state, meta

    def mark_published(self, version: int, when: float | None = None) -> None:
        """Record a publish: the version, and the delay of every label it newly absorbed."""
        when = time.time() if when is None else when
        self._delays.extend(max(when - t, 0.0) for t in self._unpublished)
        self._unpublished = []
        self.version = version
        self.counters["publishes"] += 1
        self._dirty = False

    def delay_percentiles(self) -> dict:
        if not self._delays:
            return {"p50_s": None, "p99_s": None, "labels": 0}
        d = torch.tensor(list(self._delays), dtype=torch.float64)
        return {"p50_s": round(float(d.quantile(0.5)), 3), "p99_s": round(float(d.quantile(0.99)), 3),
                "labels": len(d)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything a learner restarts from: weights, buffers, holdout, quarantine, log position."""
        return {
            "model": clone_state(self.model.state_dict()),
            "gradient": self.gradient.state_dict() if self.gradient else None,
            "bayes": self.bayes.state_dict() if self.bayes else None,
            "guard": self.guard.state_dict(),
            "quarantine": self.quarantine.state_dict() if self.quarantine else None,
            "errors": self.errors.state_dict(),
            "absorbed": self.absorbed,
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state; on any error the learner is left exactly as it was."""
        backup = self.state_dict()
        try:
            self._apply(state)
        except Exception:
            self._apply(backup)
            raise

    def _apply(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.gradient and state.get("gradient") is not None:
            self.gradient.load_state_dict(state["gradient"])
        if self.bayes and state.get("bayes") is not None:
            self.bayes.load_state_dict(state["bayes"])
        self.guard.load_state_dict(state["guard"])
        if self.quarantine and state.get("quarantine") is not None:
            self.quarantine.load_state_dict(state["quarantine"])
        self.errors.load_state_dict(state["errors"])
        self.absorbed = int(state["absorbed"])
        self.counters = {**self.counters, **state["counters"]}

    def reset(self) -> None:
        """Back to the source model; forget buffers, holdout, quarantine and the log position."""
        self.model.load_state_dict(self._source)
        if self.gradient:
            self.gradient.reset()
        self.guard.reset()
        if self.quarantine:
            self.quarantine.reset()
        if self.bayes:
            self.bayes.reset()
        self.errors.reset()
        self._reset()
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
            "learner": ({"buffer": len(self.gradient.buffer), "params": len(self.gradient.params),
                         "pending": self.gradient.pending,
                         "bayes": self.bayes.status() if self.bayes else {"off": self.bayes_off or "disabled"},
                         "last_update": self._last_update} if self.gradient
                        else {"learning": "off: monitor-only, labels are logged and watched"}),
            "label_delay": self.delay_percentiles(),
        }
