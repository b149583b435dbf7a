"""What crosses between workers, learners and replicas: the interfaces, and how rows are encoded.

- `FeedbackLog`: every accepted label, appended durably before it is
  acknowledged, numbered in commit order; the learner consumes it in order.
- `PredictionRecord`: predictions (input, what was served, when) kept on disk
  for a retention period within a byte budget, so feedback can name a
  prediction by id from any worker, replica or learner, days later.
- `SnapshotStore`: published versions, atomic and checksummed.
- `Lease`: who is the one learner of a model (dies with its holder).
- `StatusBoard`: small status records (a worker's drift and statistics, the
  learner's counters), each written by one member and read by the others.

Backends: SQLite files and a directory (one machine), or PostgreSQL (replicas
anywhere), chosen by `open_storage` in `selfheal_core.storage`.
"""
from __future__ import annotations

import json
import math
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch

# Row status in the feedback log, set at append and moved on by the learner.
NEW, LEARNED, HELD, QUARANTINED, DISCARDED = "new", "learned", "held", "quarantined", "discarded"
PAST = "past"  # answers a prediction of a domain the traffic has left: kept, not learned


class StorageError(RuntimeError):
    """A storage backend failed; `code` is the HTTP status a request should get for it."""

    code = 503

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StorageUnavailable(StorageError):
    """The log or record cannot be opened or read (corrupt, missing, unreachable)."""


class StorageFull(StorageError):
    """No space left where the data lives."""

    code = 507


class DuplicateFeedback(ValueError):
    """Feedback for a prediction id that already has some."""

    def __init__(self, pids: list[str]) -> None:
        super().__init__(f"feedback already received for prediction id(s) {', '.join(ascii_safe(p, 40) for p in pids[:5])}")
        self.pids = pids


def ascii_safe(value: Any, limit: int = 200) -> str:
    """`value` as printable ASCII, escaped and cut: safe to echo in any error message."""
    text = str(value)
    out = text.encode("ascii", "backslashreplace").decode("ascii")
    out = "".join(ch if 32 <= ord(ch) < 127 else f"\\x{ord(ch):02x}" for ch in out)
    return out if len(out) <= limit else out[:limit] + "..."


# ---------------------------------------------------------------------- tensor encodings
def encode_inputs(x: torch.Tensor) -> tuple[str, list[bytes]]:
    """(descriptor, one blob per row) of a batch x (B, ...); the descriptor holds dtype and shape."""
    x = x.detach().cpu().contiguous()
    desc = json.dumps({"dtype": str(x.dtype).removeprefix("torch."), "shape": list(x.shape[1:])})
    if len(x) == 0:
        return desc, []
    flat = x.numpy().tobytes()
    size = len(flat) // len(x)
    return desc, [flat[i * size:(i + 1) * size] for i in range(len(x))]


_DESC_CACHE: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}


def decode_input(desc: str, blob: bytes) -> torch.Tensor:
    """One stored row back as a tensor (a copy: the blob's buffer is read-only)."""
    spec = _DESC_CACHE.get(desc)
    if spec is None:
        parsed = json.loads(desc)
        if isinstance(parsed, list):  # schema 1: float32 shape lists
            parsed = {"dtype": "float32", "shape": parsed}
        spec = (np.dtype(parsed["dtype"]), tuple(parsed["shape"]))
        _DESC_CACHE[desc] = spec
    dtype, shape = spec
    return torch.from_numpy(np.frombuffer(bytes(blob), dtype=dtype).reshape(shape).copy())


def encode_target(y: torch.Tensor) -> str:
    """A label (0-d long) or values (D,) as JSON text."""
    return json.dumps(y.tolist())


def decode_targets(texts: Sequence[str], classifier: bool) -> torch.Tensor:
    values = [json.loads(t) for t in texts]
    if classifier:
        return torch.tensor([int(v) for v in values], dtype=torch.long)
    return torch.tensor([v if isinstance(v, list) else [v] for v in values], dtype=torch.float32)


# ---------------------------------------------------------------------- the feedback log
@dataclass(frozen=True)
class Entries:
    """A batch of log rows in sequence order."""

    seq: list[int]
    time: list[float]
    x: torch.Tensor  # (B, ...) inputs
    target: list[str]  # JSON: decode with decode_targets
    served: list[str | None]  # JSON of what was served, or None when unknown
    confidence: list[float | None]
    status: list[str]
    pid: list[str | None]
    predicted: list[float | None] = field(default_factory=list)  # when the answered prediction was served

    def subset(self, idx: list[int]) -> "Entries":
        pick = lambda v: [v[i] for i in idx]  # noqa: E731
        return Entries(seq=pick(self.seq), time=pick(self.time), x=self.x[idx], target=pick(self.target),
                       served=pick(self.served), confidence=pick(self.confidence), status=pick(self.status),
                       pid=pick(self.pid), predicted=pick(self.predicted) if self.predicted else [])


class FeedbackLog(ABC):
    """Append-only labelled feedback, numbered in commit order."""

    path: str  # where the log lives, for logs and status (no password)

    @abstractmethod
    def answered(self, pids: list[str]) -> list[str]:
        """The ids among `pids` that already have feedback."""

    @abstractmethod
    def _insert(self, rows: list[tuple]) -> list[int]:
        """Insert rows (pid, target, served, confidence, source, status, time, desc, input) in one
        transaction, in order; their sequence numbers. DuplicateFeedback (and nothing written) if a
        prediction id already has feedback."""

    @abstractmethod
    def _rows_after(self, after: int, batch: int) -> Sequence[tuple]:
        """Up to `batch` rows (seq, time, target, served, confidence, status, pid, desc, input) with
        seq > `after`, in order."""

    @abstractmethod
    def _rows_by_seq(self, seqs: list[int]) -> Sequence[tuple]:
        """The rows with these sequence numbers, same columns as `_rows_after`."""

    @abstractmethod
    def set_status(self, seqs: list[int], status: str) -> None:
        """Record what the learner did with these rows."""

    @abstractmethod
    def _counts(self) -> tuple[dict[str, int], int, float | None]:
        """Rows per status, the newest sequence number (0 if none) and its time."""

    @abstractmethod
    def close(self) -> None: ...

    def append(self, x: torch.Tensor, targets: list[str], served: list[str | None], confidence: list[float | None],
               pids: list[str | None] | None = None, source: str = "api", now: float | None = None,
               predicted: list[float | None] | None = None) -> list[int]:
        """Append one row per label in one durable transaction; their sequence numbers. All or
        nothing: DuplicateFeedback if an id already has feedback (nothing written). `predicted`:
        when each answered prediction was served (labels by id), so its age is known."""
        import time

        desc, blobs = encode_inputs(x)
        pid_list = pids if pids is not None else [None] * len(targets)
        when = predicted if predicted is not None else [None] * len(targets)
        now = time.time() if now is None else now
        rows = [(pid, t, s, None if c is None or math.isnan(c) else float(c), source, NEW, now, desc, blob, p)
                for pid, t, s, c, blob, p in zip(pid_list, targets, served, confidence, blobs, when)]
        return self._insert(rows)

    @staticmethod
    def _entries(rows: Sequence[tuple]) -> Entries:
        return Entries(seq=[int(r[0]) for r in rows], time=[float(r[1]) for r in rows],
                       x=torch.stack([decode_input(r[7], r[8]) for r in rows]),
                       target=[r[2] for r in rows], served=[r[3] for r in rows],
                       confidence=[None if r[4] is None else float(r[4]) for r in rows],
                       status=[r[5] for r in rows], pid=[r[6] for r in rows],
                       predicted=[None if r[9] is None else float(r[9]) for r in rows])

    def entries(self, after: int = 0, batch: int = 256) -> Iterator[Entries]:
        """Rows with seq > `after`, in order, `batch` at a time."""
        while True:
            rows = self._rows_after(after, batch)
            if not rows:
                return
            yield self._entries(rows)
            after = int(rows[-1][0])

    def by_seq(self, seqs: list[int]) -> Entries | None:
        rows = sorted(self._rows_by_seq(seqs), key=lambda r: r[0]) if seqs else []
        return self._entries(rows) if rows else None

    def stats(self) -> dict:
        """Counts by status, the newest sequence number and its time."""
        counts, seq, last = self._counts()
        return {"entries": sum(counts.values()), "by_status": counts, "last_seq": seq, "last_time": last}


# ---------------------------------------------------------------------- the prediction record
_PID = re.compile(r"^[0-9a-f]{20}[0-9a-f]{12}$")


def parse_pid(pid: str) -> tuple[str, int] | None:
    """(writer prefix, counter) of an id this package handed out; None for anything else."""
    if not isinstance(pid, str) or not _PID.match(pid):
        return None
    return pid[:20], int(pid[20:], 16)


class Recorded(NamedTuple):
    """One recorded prediction, as feedback by id needs it."""

    x: torch.Tensor  # the input the model was given
    served: torch.Tensor  # float32: the label, or the values
    confidence: float | None
    time: float  # when it was served


ROW_OVERHEAD = 96  # bytes a stored row costs beside its input and served blobs (id, time, index entries)


class PredictionRecord(ABC):
    """Predictions kept for feedback by id: id -> (input, served, confidence, time).

    Kept on disk (or in PostgreSQL) for `retention_s` seconds within `max_bytes`, the oldest
    going first when either runs out; memory holds only what is not written yet (at most
    `capacity` predictions). A label days late resolves as long as the budget holds that many
    days of traffic: `stats()` says how far back the record reaches.

    `add()` only buffers (the request path pays for an id and a list append); `flush()` writes
    the buffer in one transaction and records, per writer, the highest id written, so a reader
    knows whether an id it cannot find yet is still on its way (`lookup` waits for it) or
    unknown.
    """

    def __init__(self, capacity: int, retention_s: float = 30 * 86400.0, max_bytes: int = 2 * 2 ** 30,
                 buffer_bytes: int = 64 * 2 ** 20) -> None:
        import itertools
        import threading

        if capacity < 1 or buffer_bytes < 1:
            raise ValueError(f"capacity and buffer_bytes must be >= 1, got {capacity}, {buffer_bytes}")
        if not (math.isfinite(retention_s) and retention_s > 0):
            raise ValueError(f"retention_s must be a positive number of seconds, got {retention_s}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.capacity = capacity  # predictions held unwritten, at most ...
        self.buffer_bytes = int(buffer_bytes)  # ... and the bytes of their inputs (a 3x224x224 float input: 600 kB)
        self.dropped = 0  # unwritten predictions dropped because the buffer was full and the store failed
        self.retention_s = float(retention_s)
        self.max_bytes = int(max_bytes)
        self._row_bytes = 0.0  # mean bytes per stored row (rows of one model are alike in size)
        self._rows_written = 0
        self.pruned = 0  # rows deleted for age or for the budget, by this object
        self._lock = threading.Lock()  # guards the buffer
        self._buffer: list[tuple] = []  # (ids, x, served, confidence, time) not yet written
        self._buffered = 0
        self._buffered_bytes = 0
        # ids: 80 random bits per record object plus a counter (unique across workers and restarts,
        # and ~10x cheaper than a uuid4 per prediction)
        self._prefix = os.urandom(10).hex()
        self._counter = itertools.count()
        self._since_prune = 0

    @abstractmethod
    def _write(self, rows: list[tuple], prefix: str, last: int) -> None:
        """Insert rows (pid, served blob, confidence, time, desc, input) and record that writer
        `prefix` has written every id up to counter `last`, in one transaction."""

    @abstractmethod
    def _fetch(self, pids: list[str]) -> Sequence[tuple]:
        """Rows (pid, served blob, confidence, desc, input, time) of the given ids."""

    @abstractmethod
    def _newest(self, n: int) -> Sequence[tuple]:
        """The newest `n` rows as (desc, input, time)."""

    @abstractmethod
    def _written(self, prefixes: list[str]) -> dict[str, int]:
        """Highest counter written per writer prefix (absent: nothing written yet)."""

    @abstractmethod
    def _prune(self, keep: int, before: float) -> int:
        """Delete every row beyond the newest `keep` and every row served before `before`;
        forget writers silent for a week. Returns how many rows went."""

    @abstractmethod
    def _count(self) -> int: ...

    @abstractmethod
    def _summary(self) -> tuple[int, float | None, float]:
        """(rows, when the oldest was served or None, mean blob bytes of the newest 256 rows)."""

    @abstractmethod
    def close(self) -> None: ...

    def __len__(self) -> int:
        self.flush()
        return self._count()

    def add(self, x: torch.Tensor, served, confidence: torch.Tensor | None = None, now: float | None = None) -> list[str]:
        """Buffer a batch for the next flush; returns one new id per row. `served` is the labels or
        values served, or `Deferred(fn, outputs)`: worked out at the flush, off the request path.
        `now`: when it was served (default: now)."""
        import time

        ids = [f"{self._prefix}{next(self._counter):012x}" for _ in range(len(x))]
        when = time.time() if now is None else float(now)
        x = x.detach().cpu()
        with self._lock:  # tensors kept as they are: converted to rows at flush, off the request path
            self._buffer.append((ids, x, served, confidence, when))
            self._buffered += len(ids)
            self._buffered_bytes += x.numel() * x.element_size()
            full = self._full()
        if full:  # nobody flushes: keep memory bounded anyway
            try:
                self.flush()
            except StorageError:
                with self._lock:  # cannot write: drop the oldest until within both bounds, counted
                    while self._full() and self._buffer:
                        ids_, x_ = self._buffer.pop(0)[:2]
                        self._buffered -= len(ids_)
                        self._buffered_bytes -= x_.numel() * x_.element_size()
                        self.dropped += len(ids_)
        return ids

    def _full(self) -> bool:
        return self._buffered >= self.capacity or self._buffered_bytes >= self.buffer_bytes

    def flush(self) -> int:
        """Write buffered predictions in one transaction; returns how many. On a storage error the
        buffer is kept for the next try (ids handed out stay resolvable once it succeeds)."""
        with self._lock:
            batches, self._buffer, self._buffered, held = self._buffer, [], 0, self._buffered_bytes
            self._buffered_bytes = 0
        if not batches:
            return 0
        rows = _prediction_rows(batches)
        last = int(batches[-1][0][-1][20:], 16)
        try:
            self._write(rows, self._prefix, last)
        except StorageError:
            with self._lock:
                self._buffer = batches + self._buffer
                self._buffered += len(rows)
                self._buffered_bytes += held
            raise
        size = sum(len(r[1]) + len(r[5]) + ROW_OVERHEAD for r in rows)
        self._row_bytes = (self._row_bytes * self._rows_written + size) / (self._rows_written + len(rows))
        self._rows_written += len(rows)
        self._since_prune += len(rows)
        if self._since_prune >= 256:
            self._since_prune = 0
            self.prune()
        return len(rows)

    @property
    def keep_rows(self) -> int:
        """How many rows the byte budget holds, at the mean row size written so far."""
        return max(1, int(self.max_bytes // self._row_bytes)) if self._row_bytes else 2 ** 62

    def prune(self, now: float | None = None) -> int:
        """Delete what is past the retention period or beyond the byte budget; how many rows went."""
        import time

        gone = self._prune(self.keep_rows, (time.time() if now is None else now) - self.retention_s)
        self.pruned += gone
        return gone

    def get(self, pids: list[str]) -> dict[str, Recorded]:
        """The recorded ids among `pids`."""
        if not pids:
            return {}
        self.flush()  # this object's own buffered predictions first
        return {pid: Recorded(decode_input(desc, blob), torch.from_numpy(np.frombuffer(bytes(served), np.float32).copy()),
                              None if conf is None else float(conf), float(when))
                for pid, served, conf, desc, blob, when in self._fetch(pids)}

    def newest(self, n: int) -> tuple[torch.Tensor, list[float]] | None:
        """Inputs of the newest `n` predictions (what the traffic is now) and when each was served;
        None when nothing is recorded."""
        self.flush()  # this object's own buffered predictions first
        rows = self._newest(n)
        if not rows:
            return None
        return torch.stack([decode_input(desc, blob) for desc, blob, _ in rows]), [float(r[2]) for r in rows]

    def stats(self) -> dict:
        """How far back feedback by id reaches, and what the record holds against its budget."""
        import time

        count, oldest, blobs = self._summary()
        return {"predictions": count, "bytes": int(count * (blobs + ROW_OVERHEAD)), "max_bytes": self.max_bytes,
                "retention_s": self.retention_s, "pruned": self.pruned, "dropped_unwritten": self.dropped,
                "reaches_back_s": None if oldest is None else round(max(0.0, time.time() - oldest), 1)}

    def register(self) -> None:
        """Announce this writer before it hands out ids: a reader then knows an id with an unknown
        prefix was never handed out (404 at once) and waits only for ids still on their way."""
        self._write([], self._prefix, -1)

    def lookup(self, pids: list[str], wait_s: float = 5.0) -> tuple[dict, list[str], list[str]]:
        """(found, unknown, pending): waits up to `wait_s` for ids whose writer has not written them
        yet (a worker flushes every fraction of a second), not for ids that cannot exist; `pending`:
        still unwritten at the deadline (their writer may be unable to write: not final), `unknown`:
        never handed out or gone. An id beyond what its writer could hold unwritten (its capacity)
        cannot be on its way: a forged one is unknown at once."""
        import time

        deadline = time.monotonic() + wait_s
        parsed = {p: parse_pid(p) for p in pids}
        prefixes = sorted({v[0] for v in parsed.values() if v is not None})
        found: dict = {}
        while True:
            # the writers' marks first, the rows second: an id at or below its writer's mark is
            # then either found or gone, never still on its way
            written = self._written(prefixes) if prefixes else {}
            found.update(self.get([p for p in pids if p not in found]))
            missing = [p for p in pids if p not in found]
            waiting = [p for p in missing if parsed[p] is not None and parsed[p][0] in written
                       and written[parsed[p][0]] < parsed[p][1] <= written[parsed[p][0]] + self.capacity + 1]
            if not waiting or time.monotonic() >= deadline:
                return found, [p for p in missing if p not in waiting], waiting
            time.sleep(0.05)


class Deferred(NamedTuple):
    """What was served, worked out at the flush instead of on the request path: `fn(outputs)` ->
    (served (B, ...), confidence (B,) or None). The flush concatenates the outputs of every buffered
    batch with the same `fn` and calls it once: per request (a softmax, a max, a few tensors) it was
    a fifth of what the prediction record cost the serving worker."""
    fn: Any
    outputs: torch.Tensor


def _prediction_rows(batches: list[tuple]) -> list[tuple]:
    """Rows of buffered batches, converted together (one tensor op per field and kind of input,
    not per request)."""
    groups: dict[tuple, list[tuple]] = {}
    for batch in batches:  # grouped by what can be concatenated: dtype and shape, how served is known
        x, served = batch[1], batch[2]
        deferred = (served.fn, tuple(served.outputs.shape[1:])) if isinstance(served, Deferred) else None
        groups.setdefault((x.dtype, tuple(x.shape[1:]), deferred), []).append(batch)
    rows: list[tuple] = []
    for (_, _, deferred), group in groups.items():
        ids = [pid for b in group for pid in b[0]]
        times = [b[4] for b in group for _ in b[0]]
        desc, blobs = encode_inputs(torch.cat([b[1] for b in group]))
        if deferred is not None:
            served_t, conf_t = deferred[0](torch.cat([b[2].outputs for b in group]))
            served = served_t.reshape(len(ids), -1).float().contiguous().numpy()
            conf = [None] * len(ids) if conf_t is None else conf_t.reshape(-1).float().tolist()
        else:
            served = torch.cat([b[2].reshape(len(b[0]), -1).float() for b in group]).contiguous().numpy()
            conf = [None] * len(ids) if any(b[3] is None for b in group) else \
                torch.cat([b[3].reshape(-1).float() for b in group]).tolist()
        rows += [(pid, served[i].tobytes(), conf[i], now, desc, blobs[i])
                 for i, (pid, now) in enumerate(zip(ids, times))]
    return rows


# ---------------------------------------------------------------------- versions, leases, status
class SnapshotStore(ABC):
    """Published versions of a model: atomic, checksummed, numbered.

    A version is two records. The published one (`state`) is what every worker reads: the
    weights that differ from the source model and the reference view they were read with. The
    private one (the learner's resume state: its copy of the model, replay buffer, held labels,
    holdout) only the learner reads; a worker never pays for it (issue 28).
    """

    keep: int
    location: str

    @abstractmethod
    def save(self, state: dict[str, Any], meta: dict[str, Any] | None = None,
             private: dict[str, Any] | None = None) -> int:
        """Publish a new version (`state`), with the learner's `private` record; returns its number."""

    @abstractmethod
    def load(self, version: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, meta) of one version's published record; ValueError if it is corrupt."""

    @abstractmethod
    def load_private(self, version: int) -> dict[str, Any] | None:
        """One version's private record (None: saved without one); ValueError if it is corrupt."""

    @abstractmethod
    def versions(self) -> list[int]:
        """Versions present (valid or not), ascending."""

    def latest_version(self) -> int:
        versions = self.versions()
        return versions[-1] if versions else 0

    def load_resumable(self, before: int | None = None) -> tuple[dict, dict, dict] | None:
        """(state, meta, private) of the newest version (below `before`, if given) whose two records
        are both valid: where a learner resumes. None if there is none."""
        import logging

        for version in reversed(self.versions()):
            if before is not None and version >= before:
                continue
            try:
                private = self.load_private(version)
                if private is not None:
                    return (*self.load(version), private)
            except (ValueError, OSError) as exc:
                logging.getLogger(__name__).warning("skipping version %d for resuming: %s", version, exc)
        return None

    def load_latest(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The newest valid version, skipping corrupt ones; None if none."""
        import logging

        for version in reversed(self.versions()):
            try:
                return self.load(version)
            except (ValueError, OSError) as exc:
                logging.getLogger(__name__).warning("skipping snapshot %d: %s", version, exc)
        return None


class Lease(ABC):
    """Exclusive role of one process (the learner of a model); released when its holder dies."""

    @abstractmethod
    def try_acquire(self) -> bool:
        """Take (or keep) the lease; False while another process holds it."""

    @property
    @abstractmethod
    def held(self) -> bool: ...

    @abstractmethod
    def release(self) -> None: ...

    def is_free(self) -> bool:
        """Whether nobody holds it now (taken and given back at once when free)."""
        if self.held:
            return False
        if self.try_acquire():
            self.release()
            return True
        return False


class StatusBoard(ABC):
    """Small status records by member: each written by one process, read by all."""

    @abstractmethod
    def put(self, member: str, payload: dict[str, Any]) -> None: ...

    @abstractmethod
    def read(self, max_age_s: float | None = None) -> dict[str, dict[str, Any]]:
        """{member: payload} of records written within `max_age_s` (all when None)."""
