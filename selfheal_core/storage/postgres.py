"""PostgreSQL backends, for replicas on several machines that share no filesystem.

Selected by a `postgresql://` connection URL (libpq's: host, port, user,
database; passwords from PGPASSWORD or ~/.pgpass rather than the URL). Many
models share one database: every row carries its model's name. Needs the
optional `psycopg` package (`pip install 'selfheal[postgres]'`).

- Feedback log: sequence numbers must follow commit order, or a learner
  tailing the log past seq N could skip a row that committed later with a
  smaller number. A sequence (BIGSERIAL) does not give that under concurrent
  writers, so an append takes a per-model transaction-scoped advisory lock
  and numbers its rows MAX(seq)+1...: appends of one model are serialised
  (labels are rare next to predictions) and numbers are dense.
- Snapshots: one row per version (payload as bytea, checksummed like files).
- Lease: a session-level advisory lock on a connection of its own, released
  by the server when the holder's connection dies (TCP keepalives find a
  machine that vanished).
- Status records: one row per (model, member), upserted.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

try:
    import psycopg
    from psycopg import errors as pg_errors
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("a postgresql:// store needs psycopg: pip install 'psycopg[binary]>=3.1'") from exc

from selfheal_core.storage.base import (DuplicateFeedback, FeedbackLog, Lease, PredictionRecord, SnapshotStore,
                                        StatusBoard, StorageFull, StorageUnavailable)
from selfheal_core.storage.files import pack, unpack

log = logging.getLogger(__name__)

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS selfheal_feedback2 (
        model      TEXT NOT NULL,
        seq        BIGINT NOT NULL,
        pid        TEXT,
        target     TEXT NOT NULL,
        served     TEXT,
        confidence DOUBLE PRECISION,
        source     TEXT NOT NULL,
        status     TEXT NOT NULL,
        time       DOUBLE PRECISION NOT NULL,
        shape      TEXT NOT NULL,
        input      BYTEA NOT NULL,
        PRIMARY KEY (model, seq),
        UNIQUE (model, pid))""",
    "ALTER TABLE selfheal_feedback2 ADD COLUMN IF NOT EXISTS predicted DOUBLE PRECISION",  # when the answered prediction was served
    """CREATE TABLE IF NOT EXISTS selfheal_predictions2 (
        model      TEXT NOT NULL,
        n          BIGSERIAL,
        pid        TEXT NOT NULL,
        served     BYTEA NOT NULL,
        confidence REAL,
        time       DOUBLE PRECISION NOT NULL,
        shape      TEXT NOT NULL,
        input      BYTEA NOT NULL,
        PRIMARY KEY (model, pid))""",
    "CREATE INDEX IF NOT EXISTS selfheal_predictions2_order ON selfheal_predictions2 (model, n)",
    "CREATE INDEX IF NOT EXISTS selfheal_predictions2_time ON selfheal_predictions2 (model, time)",
    """CREATE TABLE IF NOT EXISTS selfheal_writers (
        model   TEXT NOT NULL,
        prefix  TEXT NOT NULL,
        written BIGINT NOT NULL,
        time    DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (model, prefix))""",
    """CREATE TABLE IF NOT EXISTS selfheal_snapshots (
        model   TEXT NOT NULL,
        version BIGINT NOT NULL,
        payload BYTEA NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (model, version))""",
    """CREATE TABLE IF NOT EXISTS selfheal_learner_state (
        model   TEXT NOT NULL,
        version BIGINT NOT NULL,
        payload BYTEA NOT NULL,
        PRIMARY KEY (model, version))""",
    """CREATE TABLE IF NOT EXISTS selfheal_status (
        model   TEXT NOT NULL,
        member  TEXT NOT NULL,
        time    DOUBLE PRECISION NOT NULL,
        payload BYTEA NOT NULL,
        PRIMARY KEY (model, member))""",
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
        self.where = redact(url)
        self._conn: psycopg.Connection | None = None
        with self.errors(), self.conn().transaction():  # concurrent CREATE IF NOT EXISTS can race
            self.conn().execute("SELECT pg_advisory_xact_lock(hashtext('selfheal-schema'))")
            for statement in _SCHEMA:
                self.conn().execute(statement)

    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10, application_name="selfheal",
                                         keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3)
        return self._conn

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        try:
            yield
        except (pg_errors.UniqueViolation, DuplicateFeedback):
            raise
        except pg_errors.DiskFull as exc:
            raise StorageFull(f"no space left in PostgreSQL at {self.where}: {exc}") from exc
        except psycopg.Error as exc:
            raise StorageUnavailable(f"PostgreSQL at {self.where}: {str(exc).strip()}") from exc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class PostgresFeedbackLog(FeedbackLog):
    """The feedback log of `model` in a PostgreSQL database."""

    _COLUMNS = "seq, time, target, served, confidence, status, pid, shape, input, predicted"

    def __init__(self, url: str, model: str) -> None:
        self.model = model
        self._db = Database(url)
        self.path = self._db.where
        self._lock = threading.Lock()

    def answered(self, pids: list[str]) -> list[str]:
        if not pids:
            return []
        with self._lock, self._db.errors():
            rows = self._db.conn().execute("SELECT pid FROM selfheal_feedback2 WHERE model = %s AND pid = ANY(%s)",
                                           (self.model, pids)).fetchall()
        return [r[0] for r in rows]

    def _insert(self, rows: list[tuple]) -> list[int]:
        with self._lock, self._db.errors():
            conn = self._db.conn()
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"selfheal-feedback/{self.model}",))
                    last = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM selfheal_feedback2 WHERE model = %s",
                                        (self.model,)).fetchone()[0]
                    seqs = list(range(last + 1, last + 1 + len(rows)))
                    with conn.cursor() as cur:
                        cur.executemany("INSERT INTO selfheal_feedback2 (model, seq, pid, target, served, confidence, "
                                        "source, status, time, shape, input, predicted) "
                                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                                        [(self.model, seq, *row) for seq, row in zip(seqs, rows)])
            except pg_errors.UniqueViolation:
                raise DuplicateFeedback([r[0] for r in rows if r[0] is not None]) from None
        return seqs

    def _rows_after(self, after: int, batch: int) -> Sequence[tuple]:
        with self._lock, self._db.errors():
            return self._db.conn().execute(
                f"SELECT {self._COLUMNS} FROM selfheal_feedback2 WHERE model = %s AND seq > %s ORDER BY seq LIMIT %s",
                (self.model, after, batch)).fetchall()

    def _rows_by_seq(self, seqs: list[int]) -> Sequence[tuple]:
        with self._lock, self._db.errors():
            return self._db.conn().execute(
                f"SELECT {self._COLUMNS} FROM selfheal_feedback2 WHERE model = %s AND seq = ANY(%s)",
                (self.model, seqs)).fetchall()

    def set_status(self, seqs: list[int], status: str) -> None:
        if not seqs:
            return
        with self._lock, self._db.errors():
            self._db.conn().execute("UPDATE selfheal_feedback2 SET status = %s WHERE model = %s AND seq = ANY(%s)",
                                    (status, self.model, seqs))

    def _counts(self) -> tuple[dict[str, int], int, float | None]:
        with self._lock, self._db.errors():
            conn = self._db.conn()
            counts = dict(conn.execute("SELECT status, COUNT(*) FROM selfheal_feedback2 WHERE model = %s "
                                       "GROUP BY status", (self.model,)).fetchall())
            seq, last = conn.execute("SELECT COALESCE(MAX(seq), 0), MAX(time) FROM selfheal_feedback2 "
                                     "WHERE model = %s", (self.model,)).fetchone()
        return counts, int(seq), last

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresPredictionRecord(PredictionRecord):
    """The predictions of `model` in a PostgreSQL database (see PredictionRecord)."""

    def __init__(self, url: str, capacity: int = 10_000, model: str = "default", retention_s: float = 30 * 86400.0,
                 max_bytes: int = 2 * 2 ** 30, buffer_bytes: int = 64 * 2 ** 20) -> None:
        super().__init__(capacity, retention_s, max_bytes, buffer_bytes)
        self.model = model
        self._db = Database(url)
        self.path = self._db.where
        self._db_lock = threading.Lock()

    def _write(self, rows: list[tuple], prefix: str, last: int) -> None:
        with self._db_lock, self._db.errors():
            conn = self._db.conn()
            with conn.transaction():
                if rows:
                    with conn.cursor() as cur, cur.copy("COPY selfheal_predictions2 (model, pid, served, confidence, "
                                                        "time, shape, input) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row((self.model, *row))
                conn.execute("INSERT INTO selfheal_writers (model, prefix, written, time) VALUES (%s, %s, %s, %s) "
                             "ON CONFLICT (model, prefix) DO UPDATE SET written = GREATEST(selfheal_writers.written, "
                             "EXCLUDED.written), time = EXCLUDED.time", (self.model, prefix, last, time.time()))

    def _fetch(self, pids: list[str]) -> Sequence[tuple]:
        with self._db_lock, self._db.errors():
            return self._db.conn().execute("SELECT pid, served, confidence, shape, input, time FROM "
                                           "selfheal_predictions2 WHERE model = %s AND pid = ANY(%s)",
                                           (self.model, pids)).fetchall()

    def _newest(self, n: int) -> Sequence[tuple]:
        with self._db_lock, self._db.errors():
            return self._db.conn().execute("SELECT shape, input, time FROM selfheal_predictions2 WHERE model = %s "
                                           "ORDER BY n DESC LIMIT %s", (self.model, n)).fetchall()

    def _written(self, prefixes: list[str]) -> dict[str, int]:
        with self._db_lock, self._db.errors():
            return dict(self._db.conn().execute("SELECT prefix, written FROM selfheal_writers WHERE model = %s "
                                                "AND prefix = ANY(%s)", (self.model, prefixes)).fetchall())

    def _prune(self, keep: int, before: float) -> int:
        with self._db_lock, self._db.errors():
            conn = self._db.conn()
            gone = conn.execute(
                "DELETE FROM selfheal_predictions2 WHERE model = %s AND n <= (SELECT n FROM selfheal_predictions2 "
                "WHERE model = %s ORDER BY n DESC OFFSET %s LIMIT 1)", (self.model, self.model, keep)).rowcount
            gone += conn.execute("DELETE FROM selfheal_predictions2 WHERE model = %s AND time < %s",
                                 (self.model, before)).rowcount
            conn.execute("DELETE FROM selfheal_writers WHERE model = %s AND time < %s",
                         (self.model, time.time() - 7 * 86400))
        return max(0, gone)

    def _summary(self) -> tuple[int, float | None, float]:
        with self._db_lock, self._db.errors():
            conn = self._db.conn()
            count, oldest = conn.execute("SELECT COUNT(*), MIN(time) FROM selfheal_predictions2 WHERE model = %s",
                                         (self.model,)).fetchone()
            blobs = conn.execute("SELECT AVG(length(input) + length(served)) FROM (SELECT input, served FROM "
                                 "selfheal_predictions2 WHERE model = %s ORDER BY n DESC LIMIT 256) AS newest",
                                 (self.model,)).fetchone()[0]
        return int(count), oldest, float(blobs or 0.0)

    def _count(self) -> int:
        with self._db_lock, self._db.errors():
            return int(self._db.conn().execute("SELECT COUNT(*) FROM selfheal_predictions2 WHERE model = %s",
                                               (self.model,)).fetchone()[0])

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._db_lock:
                self._db.close()


class PostgresSnapshotStore(SnapshotStore):
    """Versions of `model` as rows; keeps the newest `keep`."""

    def __init__(self, url: str, model: str, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.model, self.keep = model, keep
        self._db = Database(url)
        self.location = f"{self._db.where} (selfheal_snapshots, model {model})"
        self._lock = threading.Lock()

    def save(self, state: dict[str, Any], meta: dict[str, Any] | None = None,
             private: dict[str, Any] | None = None) -> int:
        with self._lock, self._db.errors():
            conn = self._db.conn()
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"selfheal-snapshots/{self.model}",))
                parent = conn.execute("SELECT COALESCE(MAX(version), 0) FROM selfheal_snapshots WHERE model = %s",
                                      (self.model,)).fetchone()[0]
                now = time.time()
                blob = pack({"state": state, "meta": dict(meta or {}, parent=parent, created=now)}, flat=True)
                conn.execute("INSERT INTO selfheal_snapshots (model, version, payload, created) VALUES (%s, %s, %s, %s)",
                             (self.model, parent + 1, blob, now))
                if private is not None:  # a row of its own: workers never read it
                    conn.execute("INSERT INTO selfheal_learner_state (model, version, payload) VALUES (%s, %s, %s)",
                                 (self.model, parent + 1, pack(private)))
                for table in ("selfheal_snapshots", "selfheal_learner_state"):
                    conn.execute(f"DELETE FROM {table} WHERE model = %s AND version <= %s",
                                 (self.model, parent + 1 - self.keep))
        return parent + 1

    def load(self, version: int) -> tuple[dict[str, Any], dict[str, Any]]:
        with self._lock, self._db.errors():
            row = self._db.conn().execute("SELECT payload FROM selfheal_snapshots WHERE model = %s AND version = %s",
                                          (self.model, version)).fetchone()
        if row is None:
            raise ValueError(f"snapshot {version} of {self.model}: not found")
        obj = unpack(bytes(row[0]), f"snapshot {version}")
        return obj["state"], dict(obj["meta"], version=version)

    def load_private(self, version: int) -> dict[str, Any] | None:
        with self._lock, self._db.errors():
            row = self._db.conn().execute("SELECT payload FROM selfheal_learner_state WHERE model = %s AND "
                                          "version = %s", (self.model, version)).fetchone()
        return None if row is None else unpack(bytes(row[0]), f"learner record {version}")

    def versions(self) -> list[int]:
        with self._lock, self._db.errors():
            rows = self._db.conn().execute("SELECT version FROM selfheal_snapshots WHERE model = %s ORDER BY version",
                                           (self.model,)).fetchall()
        return [int(r[0]) for r in rows]

    def latest_version(self) -> int:
        with self._lock, self._db.errors():
            return int(self._db.conn().execute("SELECT COALESCE(MAX(version), 0) FROM selfheal_snapshots "
                                               "WHERE model = %s", (self.model,)).fetchone()[0])


class PostgresLease(Lease):
    """A session-level advisory lock held on a connection of its own."""

    def __init__(self, url: str, model: str, name: str) -> None:
        self.url, self.key = url, f"selfheal-{name}/{model}"
        self._conn: psycopg.Connection | None = None

    def try_acquire(self) -> bool:
        """Whether this process holds the lease now. A connection psycopg has not yet seen fail is
        asked (one round trip): after a network drop the server may have ended the session and its
        lock, and another learner taken it; trusting the local object let both publish."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            try:
                self._conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                log.warning("the learner lease's connection to PostgreSQL was lost: the lease is gone")
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
        self._conn = None
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10, application_name="selfheal-lease",
                                   keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3)
        except psycopg.Error as exc:
            raise StorageUnavailable(f"PostgreSQL at {redact(self.url)}: {str(exc).strip()}") from exc
        if conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (self.key,)).fetchone()[0]:
            self._conn = conn
            return True
        conn.close()
        return False

    @property
    def held(self) -> bool:
        return self._conn is not None and not self._conn.closed and not self._conn.broken

    def release(self) -> None:
        if self._conn is not None:
            try:  # unlocked now: a closed session's locks go only once its server process has ended,
                # and another process asking at once was refused (seen under load in the tests)
                if not self._conn.closed and not self._conn.broken:
                    self._conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self.key,))
            except psycopg.Error:
                pass  # the session is gone, and its lock with it
            finally:
                self._conn.close()
                self._conn = None


class PostgresStatusBoard(StatusBoard):
    def __init__(self, url: str, model: str) -> None:
        self.model = model
        self._db = Database(url)
        self._lock = threading.Lock()

    def put(self, member: str, payload: dict[str, Any]) -> None:
        now = time.time()
        with self._lock, self._db.errors():
            self._db.conn().execute(
                "INSERT INTO selfheal_status (model, member, time, payload) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (model, member) DO UPDATE SET time = EXCLUDED.time, payload = EXCLUDED.payload",
                (self.model, member, now, pack({"time": now, "payload": payload})))

    def read(self, max_age_s: float | None = None) -> dict[str, dict[str, Any]]:
        since = 0.0 if max_age_s is None else time.time() - max_age_s
        with self._lock, self._db.errors():
            rows = self._db.conn().execute("SELECT member, payload FROM selfheal_status WHERE model = %s AND time >= %s",
                                           (self.model, since)).fetchall()
        out = {}
        for member, blob in rows:
            try:
                obj = unpack(bytes(blob), f"status {member}")
            except ValueError:
                continue
            out[member] = dict(obj["payload"], _time=obj["time"])
        return out
