"""SQLite backends: the feedback log and the prediction record in files next to the snapshots.

Every worker, learner and TorchServe instance on one machine that shares the
snapshot directory shares them. WAL mode, so readers and one writer work at
once across processes. The log commits with `FULL` synchronous (fsynced: an
acknowledged label survives a crash of the process or the machine); the
record with `NORMAL` (survives a process crash, no fsync per flush). Files
are created 0600: they hold inputs and labels.

Failures become `StorageUnavailable` (corrupt or unreadable file: the message
names the path and the cause) or `StorageFull` (disk full), so a server can
answer 503 or 507 for the request that hit it and keep serving.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Iterator, Sequence

from selfheal_core.storage.base import (DuplicateFeedback, FeedbackLog, PredictionRecord, StorageFull,
                                        StorageUnavailable)

log = logging.getLogger(__name__)

_LOG_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    pid        TEXT UNIQUE,          -- prediction id answered; NULL for feedback given with its input
    target     TEXT NOT NULL,        -- JSON: a class label or a list of values
    served     TEXT,                 -- JSON: what the model served, if known
    confidence REAL,                 -- classifiers: the served class's probability, if known
    source     TEXT NOT NULL,
    status     TEXT NOT NULL,        -- new, learned, held, quarantined, discarded
    time       REAL NOT NULL,        -- when it was acknowledged
    shape      TEXT NOT NULL,        -- JSON {"dtype", "shape"} of the input
    input      BLOB NOT NULL,
    predicted  REAL                  -- when the answered prediction was served (labels by id)
)"""
# Schema 1 (before tasks): label/served INTEGER columns, status learn|quarantine, float32 inputs.
_MIGRATE_1 = """
INSERT INTO feedback (seq, pid, target, served, confidence, source, status, time, shape, input)
SELECT seq, pid, CAST(label AS TEXT), CAST(served AS TEXT), NULL, source,
       CASE status WHEN 'quarantine' THEN 'quarantined' ELSE 'learned' END, time, shape, input
FROM feedback_v1"""

_RECORD_SCHEMA = ["""
CREATE TABLE IF NOT EXISTS predictions (
    n          INTEGER PRIMARY KEY AUTOINCREMENT,
    pid        TEXT UNIQUE NOT NULL,
    served     BLOB NOT NULL,        -- float32: the label, or the values
    confidence REAL,
    time       REAL NOT NULL,
    shape      TEXT NOT NULL,
    input      BLOB NOT NULL
)""", "CREATE INDEX IF NOT EXISTS predictions_time ON predictions (time)", """
CREATE TABLE IF NOT EXISTS writers (
    prefix  TEXT PRIMARY KEY,        -- one per PredictionRecord object (worker)
    written INTEGER NOT NULL,        -- highest id counter written
    time    REAL NOT NULL
)"""]


def _fail(path: str, exc: sqlite3.Error) -> Exception:
    text = str(exc)
    if "full" in text:
        return StorageFull(f"no space left for {path}: {text}")
    return StorageUnavailable(f"{path}: {text}")


@contextlib.contextmanager
def translated(path: str) -> Iterator[None]:
    """sqlite3 errors as StorageUnavailable / StorageFull naming `path`."""
    try:
        yield
    except sqlite3.IntegrityError:
        raise
    except sqlite3.Error as exc:
        raise _fail(path, exc) from exc


def connect(path: str | Path, synchronous: str) -> sqlite3.Connection:
    """A SQLite connection in WAL mode (file databases), usable across threads; the file is 0600."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # sqlite would create it 0644 (umask)
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    if str(path) != ":memory:":
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


class SQLiteFeedbackLog(FeedbackLog):
    """The log in a SQLite file (':memory:' for a throwaway log)."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self.reopened = 0  # times the file was found deleted, replaced or truncated under us and reopened
        with translated(self.path):
            self._open()

    def _open(self) -> None:
        self._conn = connect(self.path, "FULL")
        self._migrate()
        self._file = self._identity()  # (device, inode, size) after our last write

    def _identity(self) -> tuple[int, int, int] | None:
        if self.path == ":memory:":
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino, st.st_size

    def _guard_file(self) -> None:
        """Before a write (lock held): the file we write must be the one at `path`. A connection
        keeps writing to a file deleted or replaced under it, and a truncated one is garbage: labels
        acknowledged afterwards were gone after a restart (issue 26 J). Then the connection is
        reopened on what is at `path` now (a new log if none), so what is acknowledged is on disk;
        the learner sees a log that ends before its position and re-reads it from the start."""
        if self.path == ":memory:":
            return
        now, before = self._identity(), self._file
        if now is not None and before is not None and now[:2] == before[:2] and now[2] >= before[2]:
            return
        log.warning("the feedback log %s was deleted, replaced or truncated while in use: reopened (labels "
                    "acknowledged from now on are in the file at that path)", self.path)
        try:
            self._conn.close()
        except sqlite3.Error:
            pass
        self._open()
        self.reopened += 1

    def _migrate(self) -> None:
        cols = [r[1] for r in self._conn.execute("PRAGMA table_info(feedback)").fetchall()]
        if "label" in cols:  # schema 1
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("ALTER TABLE feedback RENAME TO feedback_v1")
            self._conn.execute(_LOG_SCHEMA)
            self._conn.execute(_MIGRATE_1)
            self._conn.execute("DROP TABLE feedback_v1")
            self._conn.execute("COMMIT")
        self._conn.execute(_LOG_SCHEMA)
        if "predicted" not in [r[1] for r in self._conn.execute("PRAGMA table_info(feedback)").fetchall()]:
            self._conn.execute("ALTER TABLE feedback ADD COLUMN predicted REAL")  # schema 2: no prediction times

    def answered(self, pids: list[str]) -> list[str]:
        if not pids:
            return []
        marks = ",".join("?" * len(pids))
        with self._lock, translated(self.path):
            rows = self._conn.execute(f"SELECT pid FROM feedback WHERE pid IN ({marks})", pids).fetchall()
        return [r[0] for r in rows]

    def _insert(self, rows: list[tuple]) -> list[int]:
        with self._lock, translated(self.path):
            self._guard_file()
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                seqs = [self._conn.execute(
                    "INSERT INTO feedback (pid, target, served, confidence, source, status, time, shape, input, "
                    "predicted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row).lastrowid for row in rows]
                self._conn.execute("COMMIT")
                self._file = self._identity()
            except sqlite3.IntegrityError:
                self._conn.execute("ROLLBACK")
                raise DuplicateFeedback([r[0] for r in rows if r[0] is not None]) from None
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        return seqs

    _COLUMNS = "seq, time, target, served, confidence, status, pid, shape, input, predicted"

    def _rows_after(self, after: int, batch: int) -> Sequence[tuple]:
        with self._lock, translated(self.path):
            return self._conn.execute(f"SELECT {self._COLUMNS} FROM feedback WHERE seq > ? ORDER BY seq LIMIT ?",
                                      (after, batch)).fetchall()

    def _rows_by_seq(self, seqs: list[int]) -> Sequence[tuple]:
        marks = ",".join("?" * len(seqs))
        with self._lock, translated(self.path):
            return self._conn.execute(f"SELECT {self._COLUMNS} FROM feedback WHERE seq IN ({marks})",
                                      seqs).fetchall()

    def set_status(self, seqs: list[int], status: str) -> None:
        if not seqs:
            return
        with self._lock, translated(self.path):
            self._conn.executemany("UPDATE feedback SET status = ? WHERE seq = ?", [(status, s) for s in seqs])

    def _counts(self) -> tuple[dict[str, int], int, float | None]:
        with self._lock, translated(self.path):
            counts = dict(self._conn.execute("SELECT status, COUNT(*) FROM feedback GROUP BY status").fetchall())
            seq, last = self._conn.execute("SELECT COALESCE(MAX(seq), 0), MAX(time) FROM feedback").fetchone()
        return counts, int(seq), last

    def check(self) -> None:
        """Read every page (PRAGMA quick_check): StorageUnavailable naming the damage, if any."""
        with self._lock, translated(self.path):
            result = self._conn.execute("PRAGMA quick_check").fetchall()
        if result != [("ok",)]:
            raise StorageUnavailable(f"{self.path}: integrity check failed: {result[:3]}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SQLitePredictionRecord(PredictionRecord):
    """The record in a SQLite file (':memory:' for a throwaway record)."""

    def __init__(self, path: str | Path = ":memory:", capacity: int = 10_000, retention_s: float = 30 * 86400.0,
                 max_bytes: int = 2 * 2 ** 30, buffer_bytes: int = 64 * 2 ** 20) -> None:
        super().__init__(capacity, retention_s, max_bytes, buffer_bytes)
        self.path = str(path)
        self._db_lock = threading.Lock()
        with translated(self.path):
            self._conn = connect(path, "NORMAL")
            if "label" in [r[1] for r in self._conn.execute("PRAGMA table_info(predictions)").fetchall()]:
                self._conn.execute("DROP TABLE predictions")  # schema 1: recent ids only, nothing to keep
            for statement in _RECORD_SCHEMA:
                self._conn.execute(statement)

    def _write(self, rows: list[tuple], prefix: str, last: int) -> None:
        import time

        with self._db_lock, translated(self.path):
            try:
                self._conn.execute("BEGIN")
                if rows:
                    self._conn.executemany("INSERT INTO predictions (pid, served, confidence, time, shape, input) "
                                           "VALUES (?, ?, ?, ?, ?, ?)", rows)
                self._conn.execute("INSERT INTO writers (prefix, written, time) VALUES (?, ?, ?) ON CONFLICT(prefix) "
                                   "DO UPDATE SET written = MAX(written, excluded.written), time = excluded.time",
                                   (prefix, last, time.time()))
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _fetch(self, pids: list[str]) -> Sequence[tuple]:
        marks = ",".join("?" * len(pids))
        with self._db_lock, translated(self.path):
            return self._conn.execute(f"SELECT pid, served, confidence, shape, input, time FROM predictions "
                                      f"WHERE pid IN ({marks})", pids).fetchall()

    def _newest(self, n: int) -> Sequence[tuple]:
        with self._db_lock, translated(self.path):
            return self._conn.execute("SELECT shape, input, time FROM predictions ORDER BY n DESC LIMIT ?",
                                      (n,)).fetchall()

    def _written(self, prefixes: list[str]) -> dict[str, int]:
        marks = ",".join("?" * len(prefixes))
        with self._db_lock, translated(self.path):
            return dict(self._conn.execute(f"SELECT prefix, written FROM writers WHERE prefix IN ({marks})",
                                           prefixes).fetchall())

    def _prune(self, keep: int, before: float) -> int:
        import time

        with self._db_lock, translated(self.path):
            gone = self._conn.execute("DELETE FROM predictions WHERE n <= (SELECT MAX(n) FROM predictions) - ?",
                                      (keep,)).rowcount
            gone += self._conn.execute("DELETE FROM predictions WHERE time < ?", (before,)).rowcount
            self._conn.execute("DELETE FROM writers WHERE time < ?", (time.time() - 7 * 86400,))
        return gone

    def _count(self) -> int:
        with self._db_lock, translated(self.path):
            return int(self._conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])

    def _summary(self) -> tuple[int, float | None, float]:
        with self._db_lock, translated(self.path):
            count, oldest = self._conn.execute("SELECT COUNT(*), MIN(time) FROM predictions").fetchone()
            blobs = self._conn.execute("SELECT AVG(length(input) + length(served)) FROM (SELECT input, served FROM "
                                       "predictions ORDER BY n DESC LIMIT 256)").fetchone()[0]
        return int(count), oldest, float(blobs or 0.0)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._db_lock:
                self._conn.close()
