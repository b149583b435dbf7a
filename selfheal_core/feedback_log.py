"""Durable feedback log: every accepted label, appended before it is acknowledged.

One row per label: its input, the label, what was served (if known), the
prediction id it answers (unique: feedback for an id is taken once), where it
came from, when, and whether it was learned or quarantined. Rows get an
increasing sequence number; a healer records the last number it absorbed, so
a restart (or another worker or replica sharing the log) replays exactly the
rest.

Two backends behind one interface, chosen by `open_feedback_log(url)`: an
embedded SQLite file (the default; workers and replicas on one machine share
it) and PostgreSQL (`postgresql://...`, in `selfheal_core.postgres`: replicas
on several machines share it). SQLite runs in WAL mode, so readers and one
writer work at once across processes, with `FULL` synchronous: every commit
is fsynced, so an acknowledged label survives a crash of the worker or the
machine.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

LEARN, QUARANTINE = "learn", "quarantine"

# (pid, label, served, source, status, time, shape, input bytes): one label as stored
Row = tuple[str | None, int, int | None, str, str, float, str, bytes]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    pid     TEXT UNIQUE,            -- prediction id answered; NULL for feedback given with its input
    label   INTEGER NOT NULL,
    served  INTEGER,                -- label the model served, if known
    source  TEXT NOT NULL,
    status  TEXT NOT NULL,          -- 'learn' or 'quarantine'
    time    REAL NOT NULL,
    shape   TEXT NOT NULL,
    input   BLOB NOT NULL           -- float32, C order
)"""


class DuplicateFeedback(ValueError):
    """Feedback for a prediction id that already has some."""

    def __init__(self, pids: list[str]) -> None:
        super().__init__(f"feedback already received for prediction id(s) {pids[:5]}")
        self.pids = pids


@dataclass(frozen=True)
class Entries:
    """A batch of log rows in sequence order."""

    seq: list[int]
    x: torch.Tensor  # (B, ...) float32
    y: torch.Tensor  # (B,) long
    served: torch.Tensor  # (B,) long, -1 where unknown
    quarantined: torch.Tensor  # (B,) bool


def decode_input(shape: str, blob: bytes) -> np.ndarray:
    """One stored input back as a float32 array (a copy: the blob's buffer is read-only)."""
    return np.frombuffer(blob, dtype=np.float32).reshape(json.loads(shape)).copy()


class FeedbackLog(ABC):
    """Append-only labelled feedback; backends store and fetch rows, this class encodes them."""

    path: str  # where the log lives, for logs and status (no password)

    @abstractmethod
    def answered(self, pids: list[str]) -> list[str]:
        """The ids among `pids` that already have feedback."""

    @abstractmethod
    def _insert(self, rows: list[Row]) -> list[int]:
        """Insert rows in one transaction, in order; their sequence numbers. DuplicateFeedback
        (and nothing written) if a prediction id already has feedback."""

    @abstractmethod
    def _rows_after(self, after: int, batch: int) -> Sequence[tuple]:
        """Up to `batch` rows (seq, label, served, status, shape, input) with seq > `after`, in order."""

    @abstractmethod
    def _counts(self) -> tuple[dict[str, int], int, float | None]:
        """Rows per status, the newest sequence number (0 if none) and its time."""

    @abstractmethod
    def close(self) -> None: ...

    def append(self, x: torch.Tensor, y: torch.Tensor, served: torch.Tensor | None, quarantined: torch.Tensor,
               pids: list[str] | None = None, source: str = "api") -> list[int]:
        """Append one row per label in one transaction; their sequence numbers. All or nothing:
        DuplicateFeedback if an id already has feedback (nothing written)."""
        x = x.detach().to("cpu", torch.float32).contiguous()
        shape = json.dumps(list(x.shape[1:]))
        served_list = served.tolist() if served is not None else [None] * len(y)
        pid_list = pids if pids is not None else [None] * len(y)
        now = time.time()
        rows = [(pid, int(label), s, source, QUARANTINE if q else LEARN, now, shape, xi.numpy().tobytes())
                for pid, label, s, q, xi in zip(pid_list, y.tolist(), served_list, quarantined.tolist(), x)]
        return self._insert(rows)

    def entries(self, after: int = 0, batch: int = 256) -> Iterator[Entries]:
        """Rows with seq > `after`, in order, `batch` at a time."""
        while True:
            rows = self._rows_after(after, batch)
            if not rows:
                return
            yield Entries(seq=[int(r[0]) for r in rows],
                          x=torch.from_numpy(np.stack([decode_input(r[4], r[5]) for r in rows])),
                          y=torch.tensor([r[1] for r in rows], dtype=torch.long),
                          served=torch.tensor([-1 if r[2] is None else r[2] for r in rows], dtype=torch.long),
                          quarantined=torch.tensor([r[3] == QUARANTINE for r in rows]))
            after = int(rows[-1][0])

    def last_seq(self) -> int:
        return self._counts()[1]

    def stats(self) -> dict:
        """Counts by status, the newest sequence number and its time."""
        counts, seq, last = self._counts()
        return {"entries": sum(counts.values()), "learned": counts.get(LEARN, 0),
                "quarantined": counts.get(QUARANTINE, 0), "last_seq": seq, "last_time": last}


def connect(path: str | Path, synchronous: str) -> sqlite3.Connection:
    """A SQLite connection in WAL mode (file databases) with a busy timeout, usable across threads."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    if str(path) != ":memory:":
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


class SQLiteFeedbackLog(FeedbackLog):
    """The log in a SQLite file (':memory:' for a throwaway log)."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        self._conn = connect(path, "FULL")
        self._conn.execute(_SCHEMA)
        self._lock = threading.Lock()

    def answered(self, pids: list[str]) -> list[str]:
        if not pids:
            return []
        marks = ",".join("?" * len(pids))
        with self._lock:
            rows = self._conn.execute(f"SELECT pid FROM feedback WHERE pid IN ({marks})", pids).fetchall()
        return [r[0] for r in rows]

    def _insert(self, rows: list[Row]) -> list[int]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                seqs = [self._conn.execute(
                    "INSERT INTO feedback (pid, label, served, source, status, time, shape, input) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row).lastrowid for row in rows]
                self._conn.execute("COMMIT")
            except sqlite3.IntegrityError:
                self._conn.execute("ROLLBACK")
                raise DuplicateFeedback([r[0] for r in rows if r[0] is not None]) from None
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        return seqs

    def _rows_after(self, after: int, batch: int) -> Sequence[tuple]:
        with self._lock:
            return self._conn.execute("SELECT seq, label, served, status, shape, input FROM feedback "
                                      "WHERE seq > ? ORDER BY seq LIMIT ?", (after, batch)).fetchall()

    def _counts(self) -> tuple[dict[str, int], int, float | None]:
        with self._lock:
            counts = dict(self._conn.execute("SELECT status, COUNT(*) FROM feedback GROUP BY status").fetchall())
            seq, last = self._conn.execute("SELECT COALESCE(MAX(seq), 0), MAX(time) FROM feedback").fetchone()
        return counts, int(seq), last

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_feedback_log(url: str | Path, model: str = "default") -> FeedbackLog:
    """The log at `url`: `postgresql://...` (rows of `model` in a shared database), a
    `sqlite:///path`, a plain file path, or ':memory:'."""
    url = str(url)
    if is_postgres_url(url):
        from selfheal_core.postgres import PostgresFeedbackLog  # psycopg is an optional dependency

        return PostgresFeedbackLog(url, model)
    return SQLiteFeedbackLog(url.removeprefix("sqlite://"))
