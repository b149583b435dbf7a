"""A model's learner: feedback intake over HTTP and the loop that learns, started by one call.

`start_learner` builds it from plain values (the model, its reference, the
settings, the opened storage, how feedback instances are read) for any
server: TorchServe's learner process (`selfheal_torchserve.learner_service`),
a KServe learner Deployment, a Ray Serve learner deployment.

Two threads, one owner each:
- HTTP threads take feedback: validate, resolve ids, one durable append,
  answer. They read the learner's status only as the snapshot the loop
  publishes.
- The loop owns the `Learner`. While this process holds the model's learner
  lease (one per machine with files, one per deployment with PostgreSQL) it
  consumes the log in order (woken by each append), updates, and publishes
  versions; otherwise it stands by (intake only) and retries the lease.
"""
from __future__ import annotations

import concurrent.futures
import hmac
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import torch

from selfheal_core import Learner
from selfheal_core.errors import ERROR_TYPES, ClientError
from selfheal_core.faults import Faults
from selfheal_core.intake import Intake, IntakeError
from selfheal_core.learner import reference_of
from selfheal_core.storage import DISCARDED, LEARNED, StorageError
from selfheal_serving.parsing import parse_json
from selfheal_serving.settings import HandlerSettings

log = logging.getLogger("selfheal.learner")

KEY_ENV = "SELFHEAL_MANAGEMENT_KEY"  # the management key of a learner reached directly
SECRET_HEADER = "X-Selfheal-Secret"  # the secret TorchServe's feedback plugin reads from the announcement
STATUS_EVERY_S = 1.0
CONTEXT_MAX_AGE_S = 30.0
POLL_S = 0.25  # rows appended elsewhere (other machines' intake) are found within this


class LearnerService:
    """The loop that owns the Learner, plus the status the HTTP threads read."""

    def __init__(self, learner: Learner, settings: HandlerSettings, storage, member: str, learn: bool,
                 intake: Intake | None = None, wake: threading.Event | None = None) -> None:
        """`intake`: whose counters the status shows; `wake`: the event its appends set (the
        loop waits on it), made before both so neither is wired in after construction."""
        self.learner = learner
        self.settings = settings
        self.storage = storage
        self.member = member
        self.learn = learn  # consume the log (learning too, unless the model is served monitor-only)
        self.wake = wake if wake is not None else threading.Event()
        self.stop = threading.Event()
        self.active = False
        self.resumed = False
        self.warnings: list[str] = []
        # open until that part next succeeds
        self.faults = Faults(("storage", "publish", "log", "learn", "status"))
        self._last_publish = 0.0
        self._context: tuple[float, dict | None] = (0.0, None)
        self.snapshot_status: dict = {}
        self.commands: queue.Queue = queue.Queue()  # decisions from the HTTP threads, run by the loop
        self.intake = intake  # for its counters in the status record
        self.checks_concepts = learner.concept is not None  # fixed at construction: HTTP threads may read it
        self._publish_status(board=False)  # the HTTP threads answer from this until the loop runs

    # ------------------------------------------------------------------ decisions (HTTP threads)
    def decide(self, body: Any, timeout: float = 60.0) -> dict:
        """Queue an operator's decision on a suspected relabelling for the loop; its result. A
        decision not taken within `timeout` is cancelled, never carried out later."""
        pair, action = (body.get("pair"), body.get("action")) if isinstance(body, dict) else (None, None)
        if action not in ("approve", "discard") or not (isinstance(pair, list) and len(pair) == 2
                                                        and all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in pair)):
            raise ClientError(400, 'a decision is {"pair": [served_class, given_class], "action": "approve" | '
                                    '"discard"} (pairs: GET /feedback/{model}, concept.suspected)')
        if not self.checks_concepts:
            raise ClientError(409, "this model has no labelled reference to check labels against: nothing is held")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.commands.put((tuple(pair), action, done))
        self.wake.set()
        try:
            try:
                ok, result = done.result(timeout=timeout)
            except concurrent.futures.TimeoutError:
                if done.cancel():  # the loop had not claimed it: it never runs
                    raise ClientError(503, "the learner did not take the decision in time (is it the active "
                                            "learner?); nothing was changed") from None
                ok, result = done.result()  # claimed just now: its outcome is the answer
        except ClientError:
            raise
        except Exception as exc:
            raise ClientError(503, f"the learner failed to carry out the decision: {type(exc).__name__}: "
                                    f"{exc}") from None
        if not ok:
            raise ClientError(404, result)
        return result

    def _run_commands(self) -> None:
        while True:
            try:
                (source, target), action, done = self.commands.get_nowait()
            except queue.Empty:
                return
            if not done.set_running_or_notify_cancel():
                continue  # its requester gave up and was told nothing changed
            try:
                done.set_result((True, self._decide(source, target, action)))
            except KeyError as exc:
                done.set_result((False, str(exc.args[0])))
            except Exception as exc:  # the requester hears of it; the loop goes on
                done.set_exception(exc)

    def _decide(self, source: int, target: int, action: str) -> dict:
        learner, log_ = self.learner, self.storage.log
        if action == "approve":
            seqs = learner.approve(source, target)
            log_.set_status(seqs, LEARNED)
            result = {"pair": [source, target], "action": action, "released": len(seqs)}
        else:
            dropped, since = learner.discard(source, target)
            log_.set_status(dropped, DISCARDED)
            result = {"pair": [source, target], "action": action, "dropped": len(dropped), "restored_version": None}
            if since is not None:  # some of its labels were learned: back to a version from before them
                result["restored_version"] = learner.restore_before(since, self.storage.snapshots)
        log.warning("operator decision: %s relabelling %d -> %d: %s", action, source, target, result)
        self._publish()
        result["concept"] = learner.status()["concept"]  # read here, by the loop that owns the learner
        return result

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        next_status = 0.0
        while not self.stop.is_set():
            worked = False
            try:
                if self.learn:
                    self.active = self.storage.lease("learner").try_acquire()
                    if self.active:
                        if not self.resumed:
                            self._resume()
                        self._run_commands()
                        worked = self._step()
                self.faults.ok("storage")
                self.faults.ok("learn")
            except StorageError as exc:
                if self.faults.failed("storage", exc.message):
                    log.warning("learning paused: %s", exc.message)
            except Exception as exc:  # kept in status and metrics until a step succeeds again
                if self.faults.failed("learn", f"{type(exc).__name__}: {exc}"):
                    log.exception("learning step failed")
            board = time.monotonic() >= next_status
            if board or worked:
                self._publish_status(board)
                next_status = time.monotonic() + STATUS_EVERY_S if board else next_status
            if not worked:
                self.wake.wait(POLL_S)
                self.wake.clear()

    def _resume(self) -> None:
        """Start from the newest published version and check it against the log."""
        loaded = self.storage.snapshots.load_resumable()
        if loaded is not None:
            state, meta, private = loaded
            try:
                self.learner.load_state_dict(private["learner"], reference_of(private, state))
                self.learner.version = int(meta["version"])
                log.info("resumed from version %d (log absorbed to %d)", self.learner.version,
                         self.learner.absorbed)
            except (ValueError, KeyError, RuntimeError, TypeError) as exc:  # another model's, or an older format
                self.learner.reset()
                msg = (f"the newest snapshot (version {meta.get('version')}) does not fit this model ({exc}); "
                       "learning starts from the source model and publishes above it")
                log.warning("%s", msg)
                self.warnings.append(msg[:500])
        last = self.storage.log.stats()["last_seq"]
        if self.learner.absorbed > last:
            self._rebase_log(last)
        self.resumed = True

    def _rebase_log(self, last: int) -> None:
        """The log ends before the learner's position: it was lost, replaced or truncated (at start,
        or while running). Re-read from row 0 so that new labels are learned (weights kept)."""
        msg = (f"the learner had absorbed feedback-log row {self.learner.absorbed} but the log ends at {last}: "
               f"the log was lost or replaced ({self.storage.log.path}); re-based at row 0, so new labels are "
               "learned (weights kept)")
        log.warning("%s", msg)
        self.warnings.append(msg)
        self.learner.absorbed = 0

    def _serving_context(self) -> dict | None:
        """What serving normalises with now: the freshest worker status record (cached ~1 s)."""
        at, ctx = self._context
        if time.monotonic() - at < 1.0:
            return ctx
        records = self.storage.status.read(CONTEXT_MAX_AGE_S)
        workers = sorted((r for r in records.values() if r.get("role") == "worker"), key=lambda r: r.get("_time", 0))
        ctx = workers[-1].get("context") if workers else None
        self._context = (time.monotonic(), ctx)
        return ctx

    def _step(self) -> bool:
        """Absorb the next rows, update when due, publish when due; True if there was work."""
        learner = self.learner
        context = self._serving_context()
        rows = next(self.storage.log.entries(after=learner.absorbed, batch=self.settings.heal.learn.max_labels_per_update),
                    None)
        if rows is None and learner.absorbed and self.storage.log.stats()["last_seq"] < learner.absorbed:
            self._rebase_log(self.storage.log.stats()["last_seq"])
        absorbed = rows is not None
        if absorbed:
            learner.absorb_entries(rows, context, self.storage.log,
                                   current=lambda: self.storage.predictions.newest(learner.config.learn.past_sample))
        del rows  # their inputs (64 224x224 images: 38 MB) are in replay now, not needed through the update
        heavy = learner.update_due
        if heavy:
            learner.update(context)
        if learner.dirty and time.monotonic() - self._last_publish >= self.settings.heal.snapshot_interval_s:
            self._publish()
            heavy = True
        if heavy:
            release_freed_memory()
        return absorbed

    def _publish(self) -> None:
        """Save the learner's state as a new version; a failure stays in `faults` (and the learner
        dirty, so the next round retries) until a publish succeeds."""
        self._last_publish = time.monotonic()
        try:
            state, meta, private = self.learner.snapshot()
            version = self.storage.snapshots.save(state, meta, private)
        except StorageError as exc:
            if self.faults.failed("publish", exc.message):
                log.warning("publishing failed: %s", exc.message)
            return
        self.faults.ok("publish")
        self.learner.mark_published(version)
        log.info("published version %d (log absorbed to %d)", version, self.learner.absorbed)

    def _publish_status(self, board: bool = True) -> None:
        """Refresh the status the HTTP threads read; write it to the status board when `board`.
        Never raises: what fails here is kept in `faults` like any other failure."""
        try:
            status = self.learner.status()
            log_stats = self.storage.log.stats()
            self.faults.ok("log")
        except StorageError as exc:
            status, log_stats = self.learner.status(), None
            self.faults.failed("log", exc.message)
        lag = (log_stats["last_seq"] - self.learner.absorbed) if log_stats and self.active else None
        faults = self.faults.snapshot()
        storage_error = (faults.get("storage") or faults.get("log") or {}).get("error")
        payload = {"role": "learner", "pid": os.getpid(), "host": socket.gethostname(), "active": self.active,
                   "learning": self.learn, "log": log_stats, "lag": lag, "log_error": storage_error,
                   "faults": faults, "warnings": list(self.warnings),
                   "intake": dict(self.intake.counters) if self.intake is not None else None, **status}
        self.snapshot_status = payload
        if not board:
            return
        try:
            self.storage.status.put(self.member, payload)
            self.faults.ok("status")
        except StorageError as exc:
            if self.faults.failed("status", exc.message):
                log.warning("status record: %s", exc.message)

    def current_status(self) -> dict:
        """The learner's status with the log read now (appends since the last step show as lag), and
        each live worker's version and open faults (a worker that cannot write its prediction record
        shows here, where a labeller looks, not only in that worker's own status)."""
        status = dict(self.snapshot_status)
        try:
            status["log"] = self.storage.log.stats()
            if self.active:
                status["lag"] = status["log"]["last_seq"] - int(status.get("absorbed", 0))
        except StorageError as exc:
            status["log"], status["log_error"] = None, exc.message
        try:  # how far back feedback by id reaches, against the record's budget
            status["record"] = self.storage.predictions.stats()
        except StorageError as exc:
            status["record"] = {"error": exc.message}
        try:
            records = self.storage.status.read(CONTEXT_MAX_AGE_S)
            status["workers"] = {m: {"version": r.get("version"),
                                     "faults": {c: f for c, f in (r.get("faults") or {}).items() if f.get("error")}}
                                 for m, r in records.items() if r.get("role") == "worker"}
        except StorageError as exc:
            status["workers"] = {"error": exc.message}
        return status


class IntakeServer(ThreadingHTTPServer):
    """The learner's routes: `/feedback/{model}` (GET status, POST labels) and
    `/feedback/{model}/quarantine`. A request is let in with the secret of the announcement file
    (`X-Selfheal-Secret`: TorchServe's feedback plugin, on this machine) or with one of `keys`
    as `Authorization: Bearer <key>` (the management key of a learner reached directly: KServe,
    Ray Serve)."""

    daemon_threads = True

    def __init__(self, service: LearnerService, intake: Intake, model: str, secret: str,
                 settings: HandlerSettings, host: str = "127.0.0.1", port: int = 0,
                 keys: tuple[str, ...] = ()) -> None:
        self.service, self.intake, self.model, self.secret, self.settings = service, intake, model, secret, settings
        self.keys = tuple(k.encode() for k in keys if k)
        super().__init__((host, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: IntakeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # the access log goes to debug, not stderr
        log.debug(fmt, *args)

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str) -> None:
        err = ClientError(code, message)
        self._send(code, err.body())

    def _allowed(self) -> bool:
        given = self.headers.get(SECRET_HEADER)
        if given is not None and self.server.secret:
            return hmac.compare_digest(given.encode(), self.server.secret.encode())
        scheme, _, key = (self.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and key:
            return any(hmac.compare_digest(key.strip().encode(), k) for k in self.server.keys)
        return False

    def _route(self) -> str | None:
        if not self._allowed():
            if self.server.keys:
                self._error(401, "feedback needs the management key: Authorization: Bearer <key>")
            else:
                self._error(403, "feedback reaches the learner only through the management API")
            return None
        path = self.path.split("?", 1)[0].rstrip("/")
        prefix = f"/feedback/{self.server.model}"
        if path == prefix:
            return "feedback"
        if path == f"{prefix}/quarantine":
            return "quarantine"
        self._error(404, f"no route {path[:80]}")
        return None

    def _not_allowed(self) -> None:
        if self._route() is not None:
            self._error(405, f"{self.command} is not a method of this route: GET or POST")

    do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _not_allowed  # noqa: N815

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        if self._route() == "feedback":
            status = self.server.service.current_status()
            status["model"] = self.server.model
            self._send(200, status)

    def do_POST(self) -> None:  # noqa: N802
        route = self._route()
        if route is None:
            return
        length = int(self.headers.get("Content-Length") or 0)
        limit = self.server.settings.max_body_bytes
        if length > limit:
            self._error(413, f"feedback body of {length} bytes exceeds the limit of {limit}")
            return
        raw = self.rfile.read(length)
        try:
            body = parse_json(raw, self.server.settings.json_limits, limit) if raw else None
        except ClientError as err:
            self._send(err.code, err.body())
            return
        if body is None:
            self._error(400, 'empty body: send {"feedback": [{"id": ..., "label": k}]} or {"instances": [...], '
                             '"labels": [...]}')
            return
        if route == "quarantine":
            try:
                result = self.server.service.decide(body)
            except ClientError as err:
                self._send(err.code, err.body())
                return
            self._send(200, result)
            return
        try:
            # no lock: a slow id lookup must not hold up other labellers (the log serialises appends)
            result = self.server.intake.submit(body)
        except IntakeError as err:
            self._send(err.code, {"code": err.code, "type": ERROR_TYPES.get(err.code, "Error"),
                                  "message": err.message})
            return
        result["model_version"] = self.server.service.snapshot_status.get("version")
        self._send(200, result)


@dataclass
class LearnerHandle:
    """A started learner: its intake serving on `port`, its loop not yet running (`run` blocks)."""

    service: LearnerService
    intake: Intake
    server: IntakeServer

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def secret(self) -> str:
        return self.server.secret

    def run(self, nice: int = 0) -> None:
        """The learning loop on the calling thread, until `stop()`; then the intake stops too.

        `nice`: lower this thread's priority first (Linux keeps niceness per thread: the intake
        thread, started already, keeps answering labellers promptly while learning yields the
        CPU to serving; measured on TorchServe: a learner at nice 19 from the start took two
        minutes to take its first label beside two busy processes)."""
        if nice:
            os.nice(nice)
        try:
            self.service.run()
        finally:
            self.server.shutdown()

    def stop(self) -> None:
        self.service.stop.set()
        self.service.wake.set()


def start_learner(model_name: str, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None,
                  settings: HandlerSettings, storage, read_instance: Callable[[Any], torch.Tensor] | None = None, *,
                  learn: bool = True, secret: str = "", keys: tuple[str, ...] = (), host: str = "127.0.0.1",
                  port: int = 0, member: str | None = None) -> LearnerHandle:
    """A model's learner with its intake serving (a thread of its own); call `run()` for the loop.

    `read_instance`: one feedback instance (a JSON value) -> its inputs, as the servers read an
    inference request (default: a numeric array shaped by the reference); `learn` False: intake
    only (another process learns); `secret` / `keys`: who may call (see `IntakeServer`)."""
    if not secret and not keys:
        raise ValueError("a learner's intake needs a secret or a management key: nobody could call it")
    learner = Learner(model, inputs, settings.heal, settings.task, targets)
    if read_instance is None:
        from selfheal_serving.parsing import request_inputs

        # the shape and dtype, not the reference: the learner keeps its own (large inputs compact)
        shape, dtype = tuple(inputs.shape[1:]), inputs.dtype

        def read_instance(value: Any) -> torch.Tensor:
            return request_inputs(value, shape, dtype, settings.max_instances)

    def preprocess(items: list) -> torch.Tensor:
        xs = []
        for k, item in enumerate(items):
            try:
                xs.append(learner.check_input(read_instance(item)))
            except ClientError as err:
                raise IntakeError(err.code, f"instance {k}: {err.message}") from None
            except ValueError as exc:
                raise IntakeError(400, f"instance {k}: bad inputs: {exc}") from None
            except Exception as exc:  # a user's decoding: whatever it raises is this instance's fault
                raise IntakeError(400, f"instance {k} could not be read: {type(exc).__name__}: {exc}") from None
        return torch.cat(xs)

    wake = threading.Event()  # an append wakes the loop
    intake = Intake(learner.task, lambda: storage.log, lambda: storage.predictions, preprocess,
                    settings.max_instances, settings.feedback_wait_s, on_append=lambda _seqs: wake.set())
    service = LearnerService(learner, settings, storage, member or f"learner-{socket.gethostname()}-{os.getpid()}",
                             learn=learn, intake=intake, wake=wake)
    server = IntakeServer(service, intake, model_name, secret, settings, host, port, keys)
    threading.Thread(target=server.serve_forever, name="intake", daemon=True).start()
    log.info("learner for %s: intake on %s:%d, learning %s", model_name, host, server.server_address[1],
             "when this process holds the lease" if learn else "off (intake only)")
    return LearnerHandle(service, intake, server)


def _libc():
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def release_freed_memory() -> bool:
    """Hand the allocator's free pages back to the system (glibc's malloc_trim; elsewhere
    nothing). Inputs below the mmap threshold (a 224x224 image is 602 KB) are decoded by the
    intake's threads, each with an arena of its own, and freed by the loop: their pages stayed with
    the process. The learner calls it after an update or a publish, once per round at most."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


def fixed_mmap_threshold(size: int = 2 ** 20) -> bool:
    """Map blocks of `size` bytes and more with mmap, always (glibc; elsewhere nothing happens).
    glibc raises its threshold as large blocks are freed, after which a forward's activations come
    from the heap and its freed pages stay with the process: a 224x224 ResNet-18's learner kept
    837 MB after one update, 614 MB with the threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_, if
    the operator set it, is left alone)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(_libc().mallopt(-3, size))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        return False
