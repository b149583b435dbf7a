"""SelfHealer: the serving side and the learner of one model, driven in one process.

The library's front door, for notebooks, batch jobs and benchmarks: predict,
give feedback, snapshot, resume. A server splits the two sides across
processes instead (every worker a `ServingModel`, one `Learner` per model
publishing through a `SnapshotStore`); the classes are the same, only the
channel differs: here an accepted update is installed directly, there it is
published and picked up.

Threads: `predict` may run on one thread while `drain` runs on another (see
`ServingModel`); feedback, status and snapshots belong to the thread that
drains (or the only thread).
"""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from selfheal_core.config import HealConfig
from selfheal_core.learner import Learner, UpdateResult, published_from_snapshot, reference_of
from selfheal_core.model_parts import detached_copy, is_scripted
from selfheal_core.monitor import merge_drift
from selfheal_core.serving import ServingModel
from selfheal_core.storage import FeedbackLog, SnapshotStore, encode_target

log = logging.getLogger(__name__)


class SelfHealer:
    """Serve a model that watches for drift and corrects itself.

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

    def __init__(self, model: nn.Module, reference: torch.Tensor, config: HealConfig = HealConfig(), *,
                 task: str = "classification", reference_labels: torch.Tensor | None = None,
                 store: SnapshotStore | None = None, feedback_log: FeedbackLog | None = None) -> None:
        self.config = config
        # the learner's copy is taken before serving puts any hook on the user's model; a model
        # that is only monitored is shared (the learner then only runs forwards)
        learns = config.adapt and not is_scripted(model)
        learner_model = detached_copy(model) if learns else model
        self.serving = ServingModel(model, reference, config, task, reference_labels)
        try:
            self.learner = Learner(learner_model, reference, config, self.serving.task, reference_labels)
        except BaseException:
            self.serving.close()
            raise
        self.task = self.serving.task
        self.store = store
        self.feedback_log = feedback_log
        self._last_snapshot = 0.0

    @property
    def model(self) -> nn.Module:
        return self.serving.model

    @property
    def version(self) -> int:
        return self.serving.version

    # ------------------------------------------------------------------ serving
    def check_input(self, x) -> torch.Tensor:
        return self.serving.check_input(x)

    def predict(self, x: torch.Tensor, defer: bool = False, checked: bool = False) -> torch.Tensor:
        """Corrected outputs for x (see `ServingModel.predict`)."""
        return self.serving.predict(x, defer=defer, checked=checked)

    def drain(self) -> int:
        """Monitor and adapt on everything predicted with `defer`."""
        return self.serving.drain()

    # ------------------------------------------------------------------ feedback
    def feedback(self, x: torch.Tensor, y: torch.Tensor, *, served: torch.Tensor | None = None,
                 confidence: torch.Tensor | None = None, ids: list[str] | None = None, source: str = "api") -> dict:
        """Fold labelled ground truth (labels, or targets for regression) into the model.

        `served`/`confidence` describe what was served (recomputed if not given); `ids` name the
        predictions answered (feedback per id is taken once). With a feedback log, the labels are
        appended durably first, then every row not yet absorbed (also rows others appended) is
        folded in, in log order. Raises ValueError (DuplicateFeedback for an id answered before)
        with nothing changed.
        """
        x = self.serving.check_input(x)
        y = self.task.check_targets(y, len(x))
        if ids is not None and (len(ids) != len(x) or len(set(ids)) != len(ids)):
            raise ValueError("ids must name each input once")
        self.serving.drain()  # the learner sees the drift state of everything served before
        if self.feedback_log is None:
            self.learner.absorb(x, y, served, confidence, context=self.serving.context())
            result = self._learn()
        else:
            served_json = ([encode_target(s) for s in served] if served is not None else [None] * len(y))
            conf = confidence.tolist() if confidence is not None else [None] * len(y)
            self.feedback_log.append(x, [encode_target(t) for t in y], served_json, conf, ids, source)
            result = self.catch_up()
        return {"accepted": len(y), "updated": result.updated, "rolled_back": result.rolled_back,
                "version": self.version}

    def catch_up(self) -> UpdateResult:
        """Fold in every feedback-log row after the last absorbed one, in the chunks updates were
        made in (a restart's replay gives the same weights)."""
        result = UpdateResult()
        if self.feedback_log is None:
            return result
        step = self.config.learn.update_every
        for rows in self.feedback_log.entries(after=self.learner.absorbed):
            for i in range(0, len(rows.seq), step):
                part = type(rows)(*(getattr(rows, f)[i:i + step] for f in rows.__dataclass_fields__))
                self.learner.absorb_entries(part, self.serving.context(), self.feedback_log)
                done = self._learn()
                result = UpdateResult(result.updated or done.updated, result.rolled_back or done.rolled_back)
        return result

    def _learn(self) -> UpdateResult:
        """An update if due; accepted weights go straight into serving; a snapshot when due."""
        result = self.learner.update(self.serving.context())
        if result.updated:
            self.serving.install(self.learner.published(self.serving.version))
            self.serving.sync()
        self._maybe_snapshot()
        return result

    def decide(self, source: int, target: int, action: str) -> dict:
        """An operator's decision on a suspected relabelling (`status()["concept"]["suspected"]`):
        "approve" learns it as the new concept; "discard" drops its labels and, if some were
        learned, goes back to the newest version from before them and re-reads the log from there."""
        if action == "approve":
            released = self.learner.approve(source, target)
            self._learn()
            return {"pair": [source, target], "action": action, "released": len(released)}
        if action != "discard":
            raise ValueError(f"action must be approve or discard, got {action!r}")
        dropped, since = self.learner.discard(source, target)
        result = {"pair": [source, target], "action": action, "dropped": len(dropped), "restored_version": None}
        if since is not None:
            result["restored_version"] = self.learner.restore_before(since, self.store)
            self.catch_up()
            self.serving.install(self.learner.published(self.serving.version))
            self.serving.sync()
        return result

    # ------------------------------------------------------------------ status and reset
    def status(self) -> dict:
        """JSON-able summary of both sides (after everything predicted so far was observed)."""
        self.serving.drain()
        serving, learning = self.serving.status(), self.learner.status()
        if serving["accuracy"] is not None:
            serving["accuracy"] = dict(serving["accuracy"], labelled=learning["accuracy"],
                                       corrected=self.serving.estimator.corrected(learning["accuracy"]))
        return {**serving, "drift": merge_drift(serving["drift"], learning["errors"]),
                "counters": {**serving["counters"], **learning["counters"]},
                **{k: learning[k] for k in ("guard", "quarantine", "concept", "learner", "label_delay", "absorbed")},
                "feedback_log": (dict(self.feedback_log.stats(), absorbed=self.learner.absorbed)
                                 if self.feedback_log is not None else None)}

    def reset(self) -> None:
        """Back to the source weights; forget adaptation, buffers and drift state."""
        self.serving.reset()
        self.serving.sync()
        self.learner.reset()

    # ------------------------------------------------------------------ state and snapshots
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: the learner's state and the serving state."""
        published, _, private = self.learner.snapshot(self.serving.state_dict())
        return {**published, **private}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from `state_dict()`; on any error the healer is left as it was."""
        published = published_from_snapshot(state, {"version": self.version})
        backup = self.learner.state_dict()
        self.learner.load_state_dict(state["learner"], reference_of(state))
        try:
            if state.get("serving") is not None:
                self.serving.load_state_dict(state["serving"])
        except Exception:
            self.learner.load_state_dict(backup)
            raise
        self.serving.install(published)
        self.serving.sync()

    def save_snapshot(self) -> int:
        """Publish the current state as a new version in the store."""
        if self.store is None:
            raise RuntimeError("no snapshot store configured")
        self.serving.drain()  # a snapshot holds everything predicted before it
        published, meta, private = self.learner.snapshot(self.serving.state_dict())
        version = self.store.save(published, meta, private)
        self.learner.mark_published(version)
        self.serving.published_as(version)
        self._last_snapshot = time.monotonic()
        return version

    def _maybe_snapshot(self) -> None:
        if (self.store is not None and self.learner.dirty
                and time.monotonic() - self._last_snapshot >= self.config.snapshot_interval_s):
            self.save_snapshot()

    def resume(self, version: int | None = None) -> int:
        """Load snapshot `version` (default: the newest valid one), if any, then replay the feedback
        log rows it had not absorbed; returns the version in use."""
        loaded = None
        if self.store is not None:
            if version is None:
                loaded = self.store.load_resumable()
            else:
                private = self.store.load_private(version)
                if private is None:
                    raise ValueError(f"version {version} has no learner record to resume from")
                loaded = (*self.store.load(version), private)
        if loaded is not None:
            state, meta, private = loaded
            self.load_state_dict({**state, **private})
            self.learner.version = int(meta["version"])
            self.serving.published_as(self.learner.version)
            log.info("resumed from snapshot %d", self.version)
        self.catch_up()
        return self.version

    def close(self) -> None:
        """Remove selfheal's hooks from the served model."""
        self.serving.close()
        self.learner.close()
