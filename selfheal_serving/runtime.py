"""What selfheal runs inside every replica of every server: serve, monitor, record, follow published versions.

`ReplicaRuntime` is built from plain values (the model's name, the model, its
reference sample, the settings, the opened storage) and knows no server: an
adapter (TorchServe's worker, a KServe model, a Ray deployment) turns its
requests into tensors for `check` / `predict` / `record`, and `fields()` into
its response (the `X-Selfheal` header, v2 `parameters`).

Request threads serve; `predict` and `sync` hold one lock, so a server that
calls from a thread pool (Ray) or its event loop (KServe) gets one forward at
a time on the shared model, as TorchServe's single serving thread does. One
background thread does the rest: monitoring and label-free correction on what
was served (`ServingModel.drain`) once `observe_every` predictions are queued
or `drain_interval_s` passed, writing prediction ids to the shared record every
`record_interval_s`, and every `sync_interval_s` applying a
newer published version (an idle replica serves it at once), writing this
replica's status record, and what the adapter adds (`on_status`: e.g. keeping
the model's learner process alive). Replicas never train.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from selfheal_core import ServingModel
from selfheal_core.faults import Faults
from selfheal_core.learner import published_from_snapshot
from selfheal_core.monitor import merge_drift
from selfheal_core.errors import ClientError
from selfheal_core.storage import Deferred, StorageError, open_storage
from selfheal_serving.header import UNTRUSTED, header_value
from selfheal_serving.settings import HandlerSettings

log = logging.getLogger(__name__)

STATUS_MAX_AGE_S = 30.0  # status records older than this belong to members that are gone


CALIBRATION_FILE = "selfheal_calibration.pt"  # detector thresholds computed by `selfheal archive`


def load_calibration(model_dir: Path) -> dict | None:
    path = model_dir / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file only costs the simulation it was meant to save
        log.warning("ignoring %s: %s", path.name, exc)
        return None


class StepCounter:
    """Optimizer steps taken in this process: a worker takes them only for label-free adaptation
    (LayerNorm/GroupNorm affine, feature adapter), never for labelled learning."""

    steps = 0
    _handle = None

    @classmethod
    def install(cls) -> None:
        if cls._handle is None:
            def count(*_args) -> None:
                cls.steps += 1
            from torch.optim.optimizer import register_optimizer_step_post_hook

            cls._handle = register_optimizer_step_post_hook(count)


def snapshot_root(settings: HandlerSettings, workdir: Path) -> Path:
    root = Path(settings.snapshot_dir)
    return root if root.is_absolute() else workdir / root


def open_model_storage(model_name: str, settings: HandlerSettings, workdir: Path):
    """The model's shared storage as the settings say: files under `snapshot_dir` (relative to
    `workdir`), or PostgreSQL with `log_url`."""
    return open_storage(model_name, snapshot_root(settings, workdir) / model_name, settings.log_url or None,
                        settings.snapshot_keep, settings.recent_predictions, settings.feedback_retention,
                        settings.record_bytes, settings.record_buffer_bytes)


class MetricsSink(Protocol):
    """Where a server adapter exports selfheal's state (TorchServe's metrics cache, Ray's metrics
    API, Prometheus): called from the background thread every status interval."""

    def emit(self, status: dict, drift: dict, learner: dict | None, published_at: float | None,
             estimate: float | str | None, faults: dict, dropped: dict[str, int]) -> None: ...


class ReplicaRuntime:
    """One replica's selfheal: a ServingModel, the shared storage, a background thread."""

    def __init__(self, model_name: str, settings: HandlerSettings, model: torch.nn.Module, inputs: torch.Tensor,
                 targets: torch.Tensor | None, storage, calibration: dict | None = None,
                 metrics: MetricsSink | None = None, member: str | None = None,
                 on_status: Callable[[], None] | None = None) -> None:
        """`storage`: the model's opened storage (`open_model_storage`), closed with the runtime;
        `calibration`: the detectors' thresholds from `selfheal archive` (`load_calibration`);
        `on_status`: the adapter's own job, run every status interval (its failures are kept in
        `faults` under "adapter")."""
        self.settings = settings
        self.model_name = model_name
        self.storage = storage
        self.serving = ServingModel(model, inputs, settings.heal, settings.task, targets, calibration)
        self.member = member or f"worker-{socket.gethostname()}-{os.getpid()}"
        self.metrics = metrics
        self._on_status = on_status
        StepCounter.install()
        for warning in self.serving.reference_report.warnings:
            log.warning("reference: %s", warning)
        try:
            self.storage.open_record()  # announce this writer before handing out ids
        except StorageError as exc:
            log.warning("prediction record: %s (feedback by id waits until it can be written)", exc.message)
        # each background job's failures, open until that job next succeeds
        self.faults = Faults(("monitor", "record", "sync", "install", "status", "learner", "metrics"))
        # the server's batches: count, requests, the largest, and those mixing refused and answered requests
        self.batches = {"batches": 0, "requests": 0, "largest": 0, "mixed": 0}
        self._failed_version = 0  # a published version that could not be loaded (not retried)
        self._learner: dict | None = None  # the learner's status record, read every status interval
        self._drift = self.serving.drift
        # live accuracy estimate, refreshed by the background thread; before any prediction was observed
        # the reference's own accuracy (the first answers carried no estimate at all)
        self._estimate: float | None = self.serving.estimator.reference_accuracy
        self._published_at: float | None = None  # when the newest version seen was published
        # one forward or version change at a time on the shared model, whichever thread serves
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._warned: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self.sync()

    def start(self, background: bool = True) -> "ReplicaRuntime":
        """With `background`, start the thread that runs `step()`; without it the caller steps
        (tests: no second drainer races it)."""
        if background:
            self._thread = threading.Thread(target=self._loop, name=f"selfheal-{self.model_name}", daemon=True)
            self._thread.start()
        log.info("selfheal ready: model %s (%s, %s), version %d, label-free: %s, storage %s, learner %s",
                 self.model_name, self.serving.task.kind.value, self.serving.mode, self.serving.version,
                 self.serving.corrector.summary if self.serving.corrector else "off (monitor-only)",
                 self.storage.describe(), self.settings.learner)
        return self

    # ------------------------------------------------------------------ request threads
    def check(self, x: Any) -> torch.Tensor:
        """A decoded batch, validated against the reference's shape and dtype; ClientError if not."""
        if not isinstance(x, torch.Tensor):
            raise ClientError(400, f"preprocess returned {type(x).__name__}, selfheal needs a tensor batch")
        if len(x) > self.settings.max_instances:
            raise ClientError(413, f"{len(x)} inputs exceed the limit of {self.settings.max_instances}")
        try:
            return self.serving.check_input(x)
        except ValueError as exc:
            raise ClientError(400, f"bad inputs: {exc}") from None

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs for a checked batch; a server's batch of requests may together exceed
        `max_batch` (each request was checked alone), so it is forwarded in chunks of at most that."""
        limit = self.serving.config.max_batch
        with self._lock:
            if len(x) <= limit:
                return self.serving.predict(x, defer=True, checked=True)
            return torch.cat([self.serving.predict(x[i:i + limit], defer=True, checked=True)
                              for i in range(0, len(x), limit)])

    def serve(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One request's checked batch: its outputs and `fields()` with their prediction ids."""
        outputs = self.predict(x)
        return outputs, self.fields(self.record(x, outputs))

    def note_batch(self, requests: int, answered: int) -> None:
        """How the server batched requests (status: batching works, and a refused request shared
        batches with answered ones)."""
        b = self.batches
        b["batches"] += 1
        b["requests"] += requests
        b["largest"] = max(b["largest"], requests)
        b["mixed"] += int(0 < answered < requests)

    def record(self, x: torch.Tensor, outputs: torch.Tensor) -> list[str]:
        """Prediction ids, one per input, resolvable by feedback once the record is flushed (what was
        served is worked out from the outputs at the flush)."""
        return self.storage.predictions.add(x, Deferred(self.serving.task.served, outputs.detach()))

    @property
    def version(self) -> int:
        return self.serving.version

    @property
    def drift(self) -> dict:
        """Label-free drift seen here, merged with the feedback errors the learner watches."""
        return self._drift

    def fields(self, ids: list[str], version: int | None = None, drift: dict | None = None) -> dict:
        """What an answer carries besides the model's outputs: ids, version, drift (None: unknown,
        the monitor is failing), firing detectors, the live accuracy estimate (`untrusted` where it
        cannot be trusted) and the `X-Selfheal` header that says all of it."""
        version = self.serving.version if version is None else version
        drift = self._drift if drift is None else drift
        monitoring, estimate = not self.faults.is_open("monitor"), self.estimate_field  # each read once
        return {"ids": ids, "model_version": version, "drift": drift["detected"] if monitoring else None,
                "detectors": list(drift["firing"]), "estimated_accuracy": estimate,
                "header": header_value(version, drift, ids, estimate, monitoring)}

    def header(self, ids: list[str], version: int | None = None, drift: dict | None = None) -> str:
        """The `X-Selfheal` header for an answer (`selfheal_serving.header`)."""
        return header_value(self.serving.version if version is None else version,
                            self._drift if drift is None else drift, ids, self.estimate_field,
                            not self.faults.is_open("monitor"))

    @property
    def estimate_field(self) -> float | str | None:
        """The live estimate as answers give it: `untrusted` where it cannot be trusted."""
        if self._estimate is not None and self.serving.estimate_trust() is not None:
            return UNTRUSTED
        return self._estimate

    def sync(self) -> int:
        """Apply the newest published version now, if newer than the one served; the version served."""
        self._job("sync", self._install_latest)
        with self._lock:
            self.serving.sync()
        return self.serving.version

    # ------------------------------------------------------------------ background thread
    def _loop(self) -> None:
        s = self.settings
        next_drain = next_sync = next_status = 0.0
        while not self._stop.wait(min(s.record_interval_s, s.drain_interval_s)):
            now = time.monotonic()
            drain = self.drain_due(now, next_drain)
            self.step(next_sync, next_status, drain)
            if drain:
                next_drain = now + s.drain_interval_s
            if now >= next_sync:
                next_sync = now + s.sync_interval_s
            if now >= next_status:
                next_status = now + s.status_interval_s

    def drain_due(self, now: float, next_drain: float) -> bool:
        """Whether the background round at `now` drains: a drain's cost is mostly fixed, so it waits
        for `observe_every` queued predictions (one vectorised pass) unless `next_drain` is reached."""
        return now >= next_drain or self.serving.queued >= self.serving.config.observe_every

    def step(self, sync_due_at: float = 0.0, status_due_at: float = 0.0, drain: bool = True) -> None:
        """One round of the background jobs, each on its own: one that fails is kept in `faults`
        (status, metrics; a failing monitor makes answers say drift unknown) until it next
        succeeds, and the others still run. `drain`: monitor what is queued in this round (the
        ids answered are written to the record every round)."""
        now = time.monotonic()
        drained = self._job("monitor", self.serving.drain) if drain else 0
        self._job("record", self._flush)
        if now >= sync_due_at:
            self.sync()
        status_due = now >= status_due_at
        if status_due:
            self._job("status", self._write_status)
            self._learner = self._job("learner", self.learner_status)
            if self._on_status is not None:
                self._job("adapter", self._on_status)
        errors = (self._learner or {}).get("errors")
        serving = self.serving.drift
        self._drift = merge_drift(serving, errors) if errors else serving
        if drained or status_due:  # the estimate moves with new predictions or new labels only
            self._estimate = self._job("estimate", lambda: self.estimated_accuracy(self._learner))
        if status_due and self.metrics is not None:
            self._job("metrics", lambda: self.metrics.emit(self.serving.status(), self._drift, self._learner,
                                                           self._published_at, self.estimate_field,
                                                           self.faults.snapshot(), self.dropped()))

    def _job(self, name: str, fn):
        try:
            result = fn()
        except Exception as exc:  # keep serving; kept in faults until the job succeeds again
            if self.faults.failed(name, f"{type(exc).__name__}: {exc}"):
                log.exception("selfheal background job %s failed", name)
            return None
        self.faults.ok(name)
        return result

    def _flush(self) -> None:
        try:
            self.storage.predictions.flush()
        except StorageError as exc:  # kept in memory and retried: ids handed out stay resolvable
            self._warn("record", f"prediction record: {exc.message}")
            raise

    def _warn(self, key: str, message: str, every_s: float = 60.0) -> None:
        if time.monotonic() - self._warned.get(key, -every_s) >= every_s:
            self._warned[key] = time.monotonic()
            log.warning("%s", message)

    def _install_latest(self) -> None:
        """Prepare the newest published version, if newer than the one served."""
        try:
            store = self.storage.snapshots
            latest = store.latest_version()
            if latest <= max(self.serving.pending_version, self._failed_version):
                return
            loaded = store.load_latest()
        except StorageError as exc:
            self._warn("snapshots", f"snapshot store: {exc.message}")
            raise
        if loaded is None or int(loaded[1]["version"]) <= self.serving.pending_version:
            self._failed_version = latest
            return
        refused = self.serving.counters["rebase_refused"]
        try:
            self.serving.install(published_from_snapshot(*loaded))
            self._published_at = loaded[1].get("created")
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:  # skipped, not retried; serving goes on
            self._failed_version = int(loaded[1]["version"])
            self.faults.failed("install", f"version {loaded[1]['version']} skipped: {exc}")
            self._warn("install", f"cannot install version {loaded[1]['version']}, serving version "
                                  f"{self.serving.pending_version} on: {exc}")
            return
        if self.serving.counters["rebase_refused"] > refused:  # served, but a detector kept the old reference
            self.faults.failed("install", f"version {loaded[1]['version']}: detector statistics fitted along other "
                                          "axes than this worker's were not installed (the update may read as drift)")
        else:
            self.faults.ok("install")
        log.info("installing published version %d", loaded[1]["version"])

    def _write_status(self) -> None:
        payload = {"role": "worker", "pid": os.getpid(), "version": self.serving.version,
                   "drift": self.serving.drift, "context": self.serving.context(),
                   "counters": dict(self.serving.counters), "optimizer_steps": StepCounter.steps,
                   "faults": self.faults.snapshot()}
        try:
            self.storage.status.put(self.member, payload)
        except StorageError as exc:
            self._warn("status", f"status records: {exc.message}")
            raise

    # ------------------------------------------------------------------ status
    def learner_status(self) -> dict | None:
        """The model's learner, as its status record tells (the active one first)."""
        try:
            records = self.storage.status.read(STATUS_MAX_AGE_S)
        except StorageError as exc:
            return {"error": exc.message}
        learners = [r for r in records.values() if r.get("role") == "learner"]
        learners.sort(key=lambda r: (not r.get("active"), -r.get("_time", 0)))
        return learners[0] if learners else None

    def estimated_accuracy(self, learner: dict | None) -> float | None:
        """ATC's live estimate, corrected by what the learner (its status record) observed on labelled
        predictions."""
        labelled = (learner or {}).get("accuracy")
        return self.serving.estimator.corrected(labelled) if self.serving.task.is_classifier else None

    def dropped(self) -> dict[str, int]:
        """What this replica's full buffers dropped: predictions not monitored (the queue) and
        predictions never written to the record (its unwritten buffer, while the store failed)."""
        record = self.storage.opened("predictions")
        return {"queue": int(self.serving.counters["shed"]), "record": record.dropped if record is not None else 0}

    def describe(self) -> dict:
        with self._lock:
            self.serving.sync()  # a version prepared since the last request is what is served now
        status = self.serving.status()
        learner = self.learner_status()
        if status.get("accuracy") is not None:
            status["accuracy"] = dict(status["accuracy"], labelled=(learner or {}).get("accuracy"),
                                      corrected=self.estimated_accuracy(learner))
        if learner and isinstance(learner.get("errors"), dict):
            status["drift"] = merge_drift(status["drift"], learner["errors"])
        status["learner"] = learner
        status["faults"] = self.faults.snapshot()
        status["batches"] = dict(self.batches)
        status["dropped"] = self.dropped()
        status["handler"] = {"worker": self.member, "pid": os.getpid(), "optimizer_steps": StepCounter.steps,
                             "storage": self.storage.describe(),
                             "learner_mode": self.settings.learner, "envelope": self.settings.envelope}
        return status

    def close(self) -> None:
        """Stop the background thread and close the storage."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.serving.close()
        self.storage.close()
