"""PostgreSQL backends of the feedback log and the prediction record, for replicas on several machines.

Selected by a `postgresql://` connection URL (libpq's: host, port, user,
database; passwords from PGPASSWORD or ~/.pgpass rather than the URL). Many
models share one database: every row carries its model's name. Needs the
optional `psycopg` package (`pip install selfheal[postgres]`).

Sequence numbers must follow commit order, or a worker tailing the log past
seq N could skip a row that committed later with a smaller number. A
sequence (BIGSERIAL) does not give that under concurrent writers, so an
append takes a per-model transaction-scoped advisory lock and numbers its
rows MAX(seq)+1...: appends of one model are serialised (labels are rare next
to predictions) and numbers are dense, as in the SQLite log.
"""
from __future__ import annotations

import threading
from urllib.parse import urlsplit, urlunsplit
from typing import Sequence

try:
    import psycopg
    from psycopg import errors as pg_errors
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("a postgresql:// log needs psycopg: pip install 'psycopg[binary]>=3.1'") from exc

from selfheal_core.feedback_log import DuplicateFeedback, FeedbackLog, Row
from selfheal_core.recent import PredictionRecord
from selfheal_core.recent import Row as PredictionRow

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS selfheal_feedback (
        model  TEXT NOT NULL,
        seq    BIGINT NOT NULL,
        pid    TEXT,                    -- prediction id answered; NULL for feedback given with its input
        label  INTEGER NOT NULL,
        served INTEGER,
        source TEXT NOT NULL,
        status TEXT NOT NULL,           -- 'learn' or 'quarantine'
        time   DOUBLE PRECISION NOT NULL,
        shape  TEXT NOT NULL,
        input  BYTEA NOT NULL,          -- float32, C order
        PRIMARY KEY (model, seq),
        UNIQUE (model, pid))""",
    """CREATE TABLE IF NOT EXISTS selfheal_predictions (
        model      TEXT NOT NULL,
        n          BIGSERIAL,
        pid        TEXT NOT NULL,
        label      INTEGER NOT NULL,
        confidence REAL NOT NULL,
        time       DOUBLE PRECISION NOT NULL,
        shape      TEXT NOT NULL,
        input      BYTEA NOT NULL,
        PRIMARY KEY (model, pid))""",
    "CREATE INDEX IF NOT EXISTS selfheal_predictions_order ON selfheal_predictions (model, n)",
]


def redact(url: str) -> str:
    """The URL without its password, for logs and status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


class Database:
    """One autocommit connection, reopened after it broke (e.g. the server restarted)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection | None = None
        with self.conn().transaction():  # concurrent CREATE IF NOT EXISTS can race: one at a time
            self.conn().execute("SELECT pg_advisory_xact_lock(hashtext('selfheal-schema'))")
            for statement in _SCHEMA:
                self.conn().execute(statement)

    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                                         application_name="selfheal")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class PostgresFeedbackLog(FeedbackLog):
    """The feedback log of `model` in a PostgreSQL database."""

    def __init__(self, url: str, model: str) -> None:
        self.path, self.model = redact(url), model
        self._db = Database(url)
        self._lock = threading.Lock()

    def answered(self, pids: list[str]) -> list[str]:
        if not pids:
            return []
        with self._lock:
            rows = self._db.conn().execute("SELECT pid FROM selfheal_feedback WHERE model = %s AND pid = ANY(%s)",
                                           (self.model, pids)).fetchall()
        return [r[0] for r in rows]

    def _insert(self, rows: list[Row]) -> list[int]:
        with self._lock:
            conn = self._db.conn()
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"selfheal-feedback/{self.model}",))
                    last = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM selfheal_feedback WHERE model = %s",
                                        (self.model,)).fetchone()[0]
                    seqs = list(range(last + 1, last + 1 + len(rows)))
                    with conn.cursor() as cur:
                        cur.executemany("INSERT INTO selfheal_feedback (model, seq, pid, label, served, source, "
                                        "status, time, shape, input) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                                        [(self.model, seq, *row) for seq, row in zip(seqs, rows)])
            except pg_errors.UniqueViolation:
                raise DuplicateFeedback([r[0] for r in rows if r[0] is not None]) from None
        return seqs

    def _rows_after(self, after: int, batch: int) -> Sequence[tuple]:
        with self._lock:
            return self._db.conn().execute(
                "SELECT seq, label, served, status, shape, input FROM selfheal_feedback "
                "WHERE model = %s AND seq > %s ORDER BY seq LIMIT %s", (self.model, after, batch)).fetchall()

    def _counts(self) -> tuple[dict[str, int], int, float | None]:
        with self._lock:
            conn = self._db.conn()
            counts = dict(conn.execute("SELECT status, COUNT(*) FROM selfheal_feedback WHERE model = %s "
                                       "GROUP BY status", (self.model,)).fetchall())
            seq, last = conn.execute("SELECT COALESCE(MAX(seq), 0), MAX(time) FROM selfheal_feedback "
                                     "WHERE model = %s", (self.model,)).fetchone()
        return counts, int(seq), last

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresPredictionRecord(PredictionRecord):
    """The newest `capacity` predictions of `model` in a PostgreSQL database."""

    def __init__(self, url: str, capacity: int = 10_000, model: str = "default") -> None:
        self.model = model
        super().__init__(url, capacity)

    def _open(self, url: str) -> None:
        self._conn = Database(url)  # the base class's `_conn`; closed by its close()

    def _write(self, rows: list[PredictionRow]) -> None:
        conn = self._conn.conn()
        with conn.transaction(), conn.cursor() as cur, cur.copy(
                "COPY selfheal_predictions (model, pid, label, confidence, time, shape, input) FROM STDIN") as copy:
            for row in rows:
                copy.write_row((self.model, *row))

    def _delete_beyond(self, capacity: int) -> None:
        self._conn.conn().execute(
            "DELETE FROM selfheal_predictions WHERE model = %s AND n <= (SELECT n FROM selfheal_predictions "
            "WHERE model = %s ORDER BY n DESC OFFSET %s LIMIT 1)", (self.model, self.model, capacity))

    def _fetch(self, pids: list[str]) -> Sequence[tuple]:
        return self._conn.conn().execute("SELECT pid, label, confidence, shape, input FROM selfheal_predictions "
                                         "WHERE model = %s AND pid = ANY(%s)", (self.model, pids)).fetchall()

    def _count(self) -> int:
        return int(self._conn.conn().execute("SELECT COUNT(*) FROM selfheal_predictions WHERE model = %s",
                                             (self.model,)).fetchone()[0])
