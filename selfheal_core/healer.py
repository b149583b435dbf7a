"""SelfHealer: wires monitor, corrector, learner, guard and store around one model.

It owns the served weights and two locks, so a server may call it from
several threads: the serving lock guards what a prediction touches (weights,
normalisation statistics, monitor, corrector) and is only ever held briefly;
the learning lock guards learning from labels (learner, guard, quarantine,
log position). Labelled updates train a copy of the model (the shadow) without
the serving lock and swap the accepted weights in under it, so a prediction
never waits for a gradient step. Lock order: learning, then serving.
"""
from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfheal_core.config import HealConfig
from selfheal_core.correct import LabelFreeCorrector
from selfheal_core.feedback_log import DuplicateFeedback, FeedbackLog
from selfheal_core.guard import Guard
from selfheal_core.learn import GradientLearner
from selfheal_core.learn.bayes import BayesianLastLayer
from selfheal_core.learn.gradient import last_linear
from selfheal_core.monitor import Monitor
from selfheal_core.quarantine import Quarantine
from selfheal_core.state import clone_state
from selfheal_core.store import SnapshotStore

log = logging.getLogger(__name__)

STATE_FORMAT = 2


class SelfHealer:
    """Serve a classifier that watches for drift and corrects itself.

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    >>> healer = SelfHealer(model, reference=torch.randn(200, 4))
    >>> healer.predict(torch.randn(5, 4)).shape
    torch.Size([5, 3])
    >>> healer.feedback(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))["accepted"]
    5
    >>> healer.status()["drift"]["detected"], healer.status()["version"]
    (False, 0)
    """

    def __init__(self, model: nn.Module, reference: torch.Tensor, config: HealConfig = HealConfig(),
                 reference_labels: torch.Tensor | None = None, store: SnapshotStore | None = None,
                 feedback_log: FeedbackLog | None = None) -> None:
        if not isinstance(reference, torch.Tensor) or reference.dim() < 2 or len(reference) < 20:
            raise ValueError("reference must be a tensor (R, ...) of at least 20 in-distribution inputs")
        if not torch.isfinite(reference).all():
            raise ValueError("reference contains NaN or inf")
        self.config = config
        self.model = model.eval()
        self._shadow = copy.deepcopy(model).eval()  # before any hook is registered: labelled updates train it
        self.device = next(model.parameters()).device
        self.input_shape = tuple(reference.shape[1:])
        self.store = store
        self.feedback_log = feedback_log
        self._lock = threading.RLock()  # serving state
        self._learn_lock = threading.RLock()  # learning state; taken before _lock when both are needed
        self._monitor_lock = threading.RLock()  # the detectors; taken after _lock when both are needed
        self._intake_lock = threading.RLock()  # quarantine and log appends; order: learn, intake, serving
        reference = reference.to(self.device, torch.float32)
        self._features: torch.Tensor | None = None  # input of the last Linear, captured by a hook
        head = last_linear(model)[1]
        head.register_forward_pre_hook(self._capture_features)  # first: raw features, before any adapter
        with torch.no_grad():
            ref_logits = model(reference)  # (R, C)
        ref_features = self._take_features()
        self.num_classes = ref_logits.shape[1]
        if reference_labels is not None:
            reference_labels = self.check_labels(reference_labels, len(reference))
            baseline_error = float((ref_logits.argmax(1).cpu() != reference_labels).float().mean())
            labelled = (reference, reference_labels.to(self.device))
        else:
            baseline_error, labelled = 0.0, None
        self._reference = reference  # re-read after labelled updates (monitor rebase)
        self._source_state = clone_state(model.state_dict())
        ref_probs = F.softmax(ref_logits, 1)
        self.monitor = Monitor(config.monitor).calibrate(ref_probs, ref_features, baseline_error)
        self.corrector = LabelFreeCorrector(model, head, ref_probs, config.correct)
        shadow_head = last_linear(self._shadow)[1]
        self._shadow_input: torch.Tensor | None = None  # what the shadow's head saw in its last forward
        shadow_head.register_forward_pre_hook(self._capture_shadow_input)
        self.learner = GradientLearner(self._shadow, config.learn, reference=labelled, seed=config.monitor.seed)
        self.bayes = (BayesianLastLayer(shadow_head, config.learn.bayes_prior_var, config.learn.bayes_forgetting)
                      if config.learn.bayes else None)
        self._next_update = 0.0  # monotonic time before which no labelled update starts
        self.guard = Guard(config.guard)
        self.quarantine = Quarantine(config.guard)
        self.version = 0  # snapshot version these weights were last saved or loaded as (0: source)
        self.counters = {"predictions": 0, "feedback": 0, "quarantined": 0, "updates": 0, "snapshots": 0,
                         "resets": 0, "shed": 0}
        self._queue: deque[tuple[torch.Tensor, torch.Tensor | None]] = deque()  # deferred (logits, features)
        self._queued = 0
        self._absorbed = 0  # sequence number of the last feedback-log row folded into the weights
        self._last_update: float | None = None  # wall time of the last accepted update
        self._dirty = False  # state changed since the last snapshot
        self._last_snapshot = 0.0

    def _capture_features(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._features = inputs[0].detach()

    def _capture_shadow_input(self, _module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._shadow_input = inputs[0].detach()

    def _take_features(self) -> torch.Tensor | None:
        """Features (B, F) of the last forward, as float64 on the CPU; clears them."""
        feats, self._features = self._features, None
        return None if feats is None else feats.flatten(1).to("cpu", torch.float64)

    # ----------------------------------------------------------------- validation
    def check_input(self, x: Any) -> torch.Tensor:
        """Validated float tensor on the model's device; ValueError naming the problem."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"inputs must be a tensor, got {type(x).__name__}")
        if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64, torch.uint8)):
            raise ValueError(f"inputs must be numeric, got dtype {x.dtype}")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"inputs must have shape (B, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        if len(x) == 0:
            raise ValueError("empty batch")
        if len(x) > self.config.max_batch:
            raise ValueError(f"batch of {len(x)} exceeds the limit of {self.config.max_batch}")
        x = x.to(self.device, torch.float32)
        # A finite sum proves every element finite (NaN and inf propagate); only a sum that
        # overflowed from large finite values needs the elementwise check.
        if not math.isfinite(float(x.sum())) and not torch.isfinite(x).all():
            raise ValueError("inputs contain NaN or inf")
        return x

    def check_labels(self, y: Any, n: int) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.is_complex():
            raise ValueError("labels must be a 1-D integer tensor")
        if len(y) != n:
            raise ValueError(f"got {len(y)} labels for {n} inputs")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels out of range: must be in [0, {self.num_classes - 1}]")
        return y.cpu().long()

    # ----------------------------------------------------------------- serving
    def predict(self, x: torch.Tensor, defer: bool = False, checked: bool = False) -> torch.Tensor:
        """Corrected logits (B, C); observes the batch and adapts afterwards (predict, then adapt).

        Only the forward pass happens here: outputs, features and normalisation inputs are queued
        and `drain()` monitors and adapts on many requests in one vectorised pass. Without `defer`,
        predict drains once `observe_every` samples are queued (and status(), feedback() and
        snapshots drain first); with `defer` that is left to the caller, e.g. a server's background
        thread. The queue is bounded; when a drain falls behind, the oldest entries are shed and
        counted. `checked`: x already passed
        `check_input` (a server validates each request on its own before batching them).
        """
        x = self.check_input(x) if not checked else x.to(self.device, torch.float32)
        # inference_mode, cheaper than no_grad: what the forward leaves (outputs, features, BN
        # inputs) is only read later, outside it, where results are normal tensors again.
        with self._lock, torch.inference_mode():
            if self.corrector.norm.active:
                with self.corrector.recording():
                    raw = self.model(x)  # (B, C)
            else:
                raw = self.model(x)
            logits = self.corrector.adjust(raw)
            self.counters["predictions"] += len(x)
            # raw outputs only: softmax and feature conversion happen once per drain
            feats, self._features = self._features, None
            self._queue.append((raw, feats))
            self._queued += len(x)
            while self._queued > self.config.max_queued and len(self._queue) > 1:
                self._queued -= len(self._queue.popleft()[0])
                self.counters["shed"] += 1
            due = not defer and self._queued >= self.config.observe_every
        if due:
            self.drain()
        return logits.clone()  # a normal tensor: callers may use it in autograd (e.g. as a teacher)

    def drain(self) -> int:
        """Monitor and adapt on everything `predict(defer=True)` queued; returns the samples seen.

        Requests wait only for the short steps under the serving lock (taking the queue, folding
        statistics into the model); the detectors run under their own lock.
        """
        with self._lock:
            if not self._queue:
                return 0
            items, self._queue, n = list(self._queue), deque(), self._queued
            self._queued = 0
        with torch.no_grad():
            feats = [f for _, f in items]
            features = None
            if all(f is not None for f in feats):
                features = torch.cat([f.flatten(1) for f in feats]).to("cpu", torch.float64)
            probs = F.softmax(torch.cat([raw for raw, _ in items]), 1)
            with self._monitor_lock:
                fired = self.monitor.observe_predictions(probs, features)
            with self._lock:
                started = self.corrector.observe(probs, features, fired)
                if self.corrector.active:
                    self._dirty = True
        if started:
            log.info("%s drift after %d predictions: started %s", "+".join(fired),
                     self.counters["predictions"], ", ".join(started))
        self._maybe_snapshot()
        return n

    def feedback(self, x: torch.Tensor, y: torch.Tensor, predicted: torch.Tensor | None = None,
                 confidence: torch.Tensor | None = None, ids: list[str] | None = None,
                 source: str = "api", defer: bool = False) -> dict:
        """Fold labelled ground truth into the model.

        `predicted` and `confidence` describe what was served (recomputed if not given); `ids`
        name the predictions answered (feedback per id is taken once). With a feedback log, the
        labels are appended durably first, then every row not yet absorbed (also rows other
        workers appended) is folded in, in log order; with `defer` that is left to the next
        `catch_up()`/`sync()` (a server's background thread), so the call returns once the labels are
        durable. Raises ValueError (DuplicateFeedback for an id answered before) with nothing changed.
        """
        x = self.check_input(x)
        y = self.check_labels(y, len(x))
        if predicted is not None:
            predicted = self.check_labels(predicted, len(x))
        if confidence is not None:
            if not isinstance(confidence, torch.Tensor) or confidence.shape != (len(x),) \
                    or not bool(((confidence >= 0) & (confidence <= 1)).all()):
                raise ValueError(f"confidence must be a tensor ({len(x)},) of values in [0, 1]")
            confidence = confidence.cpu().double()
        if ids is not None and (len(ids) != len(x) or len(set(ids)) != len(ids)
                                or not all(isinstance(i, str) for i in ids)):
            raise ValueError(f"ids must be {len(x)} distinct strings")
        if not defer:
            self.drain()  # the monitor's view (input drift) decides what quarantine holds back
        # Intake (screening and the durable append) has its own lock, so feedback never waits for
        # an update the background thread is running under the learning lock.
        with self._intake_lock:
            if self.feedback_log is not None and ids:
                answered = self.feedback_log.answered(ids)
                if answered:
                    raise DuplicateFeedback(answered)
            with self._lock, self._monitor_lock:
                if predicted is None or confidence is None:
                    with torch.no_grad():
                        probs = F.softmax(self.model(x), 1).cpu().double()
                    self._take_features()
                    confidence, predicted = probs.max(1)
                drift = self.monitor.state
            backup = self.quarantine.checkpoint()
            inputs_drifted = drift.detected and any(n in ("confidence", "feature_shift") for n in drift.firing)
            held = (self.quarantine.screen(predicted, y, confidence, inputs_drifted) if self.config.guard.quarantine
                    else torch.zeros(len(y), dtype=torch.bool))
            if self.feedback_log is not None:
                try:
                    self.feedback_log.append(x, y, predicted, held, ids, source)
                except BaseException:
                    self.quarantine.rollback(backup)
                    raise
        if self.feedback_log is None:
            with self._learn_lock:
                result = self._absorb(x, y, predicted, held)
        else:
            result = {"updated": False, "rolled_back": False} if defer else self.catch_up()
        if not defer:
            self._maybe_snapshot()
        return {"accepted": len(y), "quarantined": int(held.sum()), **result, "version": self.version}

    def catch_up(self) -> dict:
        """Fold in every feedback-log row after the last absorbed one (a restart's replay)."""
        result = {"updated": False, "rolled_back": False}
        if self.feedback_log is None:
            return result
        step = self.config.learn.update_every  # replay in the chunks updates were made in
        with self._learn_lock:
            for rows in self.feedback_log.entries(after=self._absorbed):
                for i in range(0, len(rows.y), step):
                    part = slice(i, i + step)
                    done = self._absorb(rows.x[part].to(self.device), rows.y[part], rows.served[part],
                                        rows.quarantined[part])
                    result = {k: result[k] or done[k] for k in result}
                    self._absorbed = rows.seq[part][-1]
        return result

    def _absorb(self, x: torch.Tensor, y: torch.Tensor, served: torch.Tensor, held: torch.Tensor) -> dict:
        """Learn from labelled pairs: error monitor, holdout, (guarded) update; skip quarantined ones.

        Runs under the learning lock; the update itself trains the shadow and takes the serving
        lock only to copy weights in and out.
        """
        known = served >= 0
        with self._lock, self._monitor_lock:
            self.monitor.observe_errors((served != y)[known])
            self.counters["feedback"] += len(y)
            self.counters["quarantined"] += int(held.sum())
            self._dirty = True
        none = {"updated": False, "rolled_back": False}
        train_x, train_y = self.guard.admit(x, y, skip=held)
        if not (len(train_y) and self.learner.add(train_x, train_y)):
            return none
        return self._budgeted_update()

    def _budgeted_update(self) -> dict:
        """An update if the guard is ready and the compute budget allows; else the labels wait in the
        learner's buffer for the next one (`sync()` also runs it once the pause is over)."""
        if not self.guard.ready or time.monotonic() < self._next_update:
            return {"updated": False, "rolled_back": False}
        started = time.monotonic()
        self._next_update = started + self.config.learn.min_update_interval_s
        try:
            return self._update()
        finally:  # the time budget: pause in proportion to what this update took
            took = time.monotonic() - started
            share = self.config.learn.max_time_share
            self._next_update = max(self._next_update, time.monotonic() + took * (1 / share - 1))

    def _update(self) -> dict:
        """One guarded update of the shadow from the learner's buffer; accepted weights are copied in."""
        with self._lock:
            self._shadow.load_state_dict(self.model.state_dict())  # current weights and statistics
        shadow = self._shadow
        before = self.guard.evaluate(shadow)
        saved = self.learner.copy_params()
        bayes_saved = self.bayes.state_dict() if self.bayes else None
        if self.bayes:
            new_x, new_y = self.learner.newest()
            with torch.no_grad():
                shadow(new_x.to(self.device))
            self.bayes.update(self._shadow_input, new_y)
        self.learner.step()
        if not self.guard.judge(before, self.guard.evaluate(shadow)):
            self.learner.restore_params(saved)
            if self.bayes:
                self.bayes.load_state_dict(bayes_saved)
            return {"updated": False, "rolled_back": True}
        with torch.no_grad():
            ref_probs = F.softmax(shadow(self._reference), 1)
        ref_features = self._shadow_input.flatten(1).to("cpu", torch.float64)
        install_reference = self.monitor.prepare_rebase(ref_probs, ref_features)  # the fit: outside the lock
        trained = dict(shadow.named_parameters())
        with self._lock, self._monitor_lock, torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(trained[name])
            install_reference()
            self.counters["updates"] += 1
            self._last_update = time.time()
        return {"updated": True, "rolled_back": False}

    def status(self) -> dict:
        """JSON-able summary: drift, version, counters and each part's state (after everything
        predicted so far was observed)."""
        self.drain()
        with self._learn_lock, self._intake_lock, self._lock, self._monitor_lock:
            return {
                "version": self.version,
                "drift": self.monitor.state.as_dict(),
                "counters": dict(self.counters),
                "corrector": self.corrector.status(),
                "guard": self.guard.status(),
                "quarantine": self.quarantine.status(),
                "learner": {"buffer": len(self.learner.buffer), "params": len(self.learner.params),
                            "bayes": self.bayes.status() if self.bayes else None,
                            "last_update": self._last_update},
                "feedback_log": (dict(self.feedback_log.stats(), absorbed=self._absorbed)
                                 if self.feedback_log is not None else None),
            }

    def reset(self) -> None:
        """Back to the source weights; forget adaptation, buffers and drift state."""
        with self._learn_lock, self._intake_lock, self._lock, self._monitor_lock:
            self._queue, self._queued = deque(), 0  # predictions of the forgotten state: not observed
            self.model.load_state_dict(self._source_state)
            self.corrector.reset()
            self.learner.reset()
            self.guard.reset()
            self.quarantine.reset()
            if self.bayes:
                self.bayes.reset()
            self.monitor.reset()
            self.version = 0
            self.counters["resets"] += 1
            self._dirty = True

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to resume: weights, running statistics, buffers, counters."""
        with self._learn_lock, self._intake_lock, self._lock, self._monitor_lock:
            return {
                "format": STATE_FORMAT,
                "model": clone_state(self.model.state_dict()),
                "monitor": self.monitor.state_dict(),
                "corrector": self.corrector.state_dict(),
                "learner": self.learner.state_dict(),
                "guard": self.guard.state_dict(),
                "quarantine": self.quarantine.state_dict(),
                "bayes": self.bayes.state_dict() if self.bayes else None,
                "absorbed": self._absorbed,
                "counters": dict(self.counters),
            }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state; on any error the healer is left exactly as it was."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"unsupported healer state (format {state.get('format') if isinstance(state, dict) else None})")
        with self._learn_lock, self._intake_lock, self._lock, self._monitor_lock:
            backup = self.state_dict()
            try:
                self._apply(state)
            except Exception:
                self._apply(backup)
                raise

    def _apply(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.monitor.load_state_dict(state["monitor"])
        self.corrector.load_state_dict(state["corrector"])
        self.learner.load_state_dict(state["learner"])
        self.guard.load_state_dict(state["guard"])
        self.quarantine.load_state_dict(state["quarantine"])
        if self.bayes and state["bayes"] is not None:
            self.bayes.load_state_dict(state["bayes"])
        self._absorbed = int(state["absorbed"])
        self.counters = {**self.counters, **state["counters"]}

    # ----------------------------------------------------------------- snapshots
    def save_snapshot(self) -> int:
        """Publish the current state as a new version in the store."""
        if self.store is None:
            raise RuntimeError("no snapshot store configured")
        self.drain()  # a snapshot holds everything predicted before it
        with self._learn_lock:  # the state is copied under the serving lock, written (fsync) outside it
            with self._lock:
                meta = {"feedback": self.counters["feedback"], "feedback_seq": self._absorbed,
                        "validation_error": self.guard.last_error, "based_on": self.version}
                state = self.state_dict()
                self._dirty = False
            version = self.store.save(state, meta)
            with self._lock:
                self.version = version
                self.counters["snapshots"] += 1
                self._last_snapshot = time.monotonic()
            return version

    def resume(self, version: int | None = None) -> int:
        """Load snapshot `version` (default: the newest valid one), if any, then replay the feedback
        log rows it had not absorbed; returns the version in use."""
        with self._learn_lock:
            loaded = None
            if self.store is not None:
                loaded = self.store.load_latest() if version is None else self.store.load(version)
            if loaded is not None:
                state, meta = loaded
                self.load_state_dict(state)
                self.version = int(meta["version"])
                self._dirty = False
                log.info("resumed from snapshot %d", self.version)
            before = self._absorbed
            self.catch_up()
            if self._absorbed > before:
                log.info("replayed feedback log rows %d..%d", before + 1, self._absorbed)
            return self.version

    def sync(self) -> bool:
        """Become one model with the other workers and replicas sharing the store and log.

        The publisher (the holder of the store's lease) folds in log rows others appended and
        publishes when due; every other worker loads a newer published version (its state already
        absorbs the log up to the row it records), then folds in rows appended since. Cheap when
        there is nothing new: a directory listing and one indexed query. Returns True if the
        weights changed.
        """
        self.drain()
        with self._learn_lock:
            before = (self.version, self._absorbed)
            if self.store is not None and self.store.latest_version() > self.version:
                self.resume()  # another process published (or this one just took the lease over)
            else:
                self.catch_up()
                if self.learner.pending >= self.config.learn.update_every:
                    self._budgeted_update()  # labels that waited out the compute budget
            self._maybe_snapshot()
            return (self.version, self._absorbed) != before

    def _maybe_snapshot(self) -> None:
        """Publish when due: dirty, interval passed, and this process holds the publisher lease."""
        if (self.store is not None and self._dirty
                and time.monotonic() - self._last_snapshot >= self.config.snapshot_interval_s
                and self.store.try_lease()):
            self.save_snapshot()
