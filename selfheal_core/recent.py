"""Bounded, durable record of recent predictions, so that feedback can name a prediction by id.

Kept next to the feedback log, so a restarted worker, another worker or
another replica sharing it can resolve an id: a SQLite file by default (WAL
mode, NORMAL synchronous: a commit survives a crash of the worker and costs
no fsync) or PostgreSQL (`selfheal_core.postgres`). Only the newest
`capacity` predictions are kept. `add()` only buffers (the request path pays
for an id and a list append); `flush()` writes the buffer in one
transaction, from a server's background thread or before a lookup.
"""
from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Sequence

import torch

from selfheal_core.feedback_log import connect, decode_input, is_postgres_url

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    n          INTEGER PRIMARY KEY AUTOINCREMENT,
    pid        TEXT UNIQUE NOT NULL,
    label      INTEGER NOT NULL,
    confidence REAL NOT NULL,
    time       REAL NOT NULL,
    shape      TEXT NOT NULL,
    input      BLOB NOT NULL
)"""

_PRUNE_EVERY = 256  # inserts between deletions of rows beyond capacity

# (pid, label, confidence, time, shape, input bytes): one prediction as stored
Row = tuple[str, int, float, float, str, bytes]


def _rows(batches: list[tuple]) -> list[Row]:
    """Rows of buffered batches, converted together (one tensor op per field, not per request);
    the inputs' bytes are sliced from one buffer per input shape."""
    rows: list[Row] = []
    by_shape: dict[tuple, list[tuple]] = {}
    for batch in batches:
        by_shape.setdefault(tuple(batch[1].shape[1:]), []).append(batch)
    for shape, group in by_shape.items():
        ids = [pid for b in group for pid in b[0]]
        times = [b[4] for b in group for _ in b[0]]
        blob = torch.cat([b[1] for b in group]).contiguous().numpy().tobytes()
        labels = torch.cat([b[2].reshape(-1) for b in group]).tolist()
        conf = torch.cat([b[3].reshape(-1).float() for b in group]).tolist()
        size, shape_json = len(blob) // len(ids), json.dumps(list(shape))
        rows += [(pid, y, c, now, shape_json, blob[i * size:(i + 1) * size])
                 for i, (pid, y, c, now) in enumerate(zip(ids, labels, conf, times))]
    return rows


class PredictionRecord:
    """The newest `capacity` predictions: id -> (input, served label, confidence), in SQLite.

    >>> rec = PredictionRecord(capacity=2)
    >>> ids = rec.add(torch.zeros(3, 4), torch.tensor([1, 2, 0]), torch.ones(3))
    >>> _ = rec.flush(); rec.prune(); len(rec), sorted(rec.get(ids))  == sorted(ids[1:])
    (2, True)
    """

    def __init__(self, path: str | Path = ":memory:", capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._lock = threading.Lock()  # guards the buffer and the connection
        self._since_prune = 0
        self._buffer: list[tuple] = []  # rows added but not yet written
        self._buffered = 0  # predictions in the buffer
        # ids: 80 random bits per record object plus a counter (unique across workers and restarts,
        # and ~10x cheaper than a uuid4 per prediction)
        self._prefix = os.urandom(10).hex()
        self._counter = itertools.count()
        self._open(path)

    # ---------------------------------------------------------------- storage (SQLite here)
    def _open(self, path: str | Path) -> None:
        self._conn = connect(path, "NORMAL")
        self._conn.execute(_SCHEMA)

    def _write(self, rows: list[Row]) -> None:
        self._conn.execute("BEGIN")
        self._conn.executemany("INSERT INTO predictions (pid, label, confidence, time, shape, input) "
                               "VALUES (?, ?, ?, ?, ?, ?)", rows)
        self._conn.execute("COMMIT")

    def _delete_beyond(self, capacity: int) -> None:
        self._conn.execute("DELETE FROM predictions WHERE n <= (SELECT MAX(n) FROM predictions) - ?", (capacity,))

    def _fetch(self, pids: list[str]) -> Sequence[tuple]:
        marks = ",".join("?" * len(pids))
        return self._conn.execute(f"SELECT pid, label, confidence, shape, input FROM predictions "
                                  f"WHERE pid IN ({marks})", pids).fetchall()

    def _count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])

    # ---------------------------------------------------------------- interface
    def __len__(self) -> int:
        self.flush()
        with self._lock:
            return self._count()

    def add(self, x: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor) -> list[str]:
        """Buffer a batch for the next flush; returns one new id per row."""
        ids = [f"{self._prefix}{next(self._counter):012x}" for _ in range(len(x))]
        with self._lock:  # tensors kept as they are: converted to rows at flush, off the request path
            self._buffer.append((ids, x.detach().to("cpu", torch.float32), labels, confidence, time.time()))
            self._buffered += len(ids)
            full = self._buffered >= self.capacity
        if full:  # nobody flushes: keep memory bounded anyway
            self.flush()
        return ids

    def flush(self) -> int:
        """Write buffered predictions in one transaction; returns how many."""
        with self._lock:
            batches, self._buffer, self._buffered = self._buffer, [], 0
            rows = _rows(batches)
            if not rows:
                return 0
            self._write(rows)
            self._since_prune += len(rows)
        if self._since_prune >= _PRUNE_EVERY:
            self.prune()
        return len(rows)

    def prune(self) -> None:
        """Delete all but the newest `capacity` rows."""
        with self._lock:
            self._delete_beyond(self.capacity)
            self._since_prune = 0

    def get(self, pids: list[str]) -> dict[str, tuple[torch.Tensor, int, float]]:
        """The recorded ids among `pids`: id -> (input, served label, confidence)."""
        if not pids:
            return {}
        self.flush()
        with self._lock:
            rows = self._fetch(pids)
        return {pid: (torch.from_numpy(decode_input(shape, bytes(blob))), int(label), float(conf))
                for pid, label, conf, shape, blob in rows}

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._conn.close()


def open_prediction_record(url: str | Path, capacity: int = 10_000, model: str = "default") -> PredictionRecord:
    """The record at `url`: `postgresql://...` (rows of `model` in a shared database) or a SQLite path."""
    url = str(url)
    if is_postgres_url(url):
        from selfheal_core.postgres import PostgresPredictionRecord  # psycopg is an optional dependency

        return PostgresPredictionRecord(url, capacity, model)
    return PredictionRecord(url.removeprefix("sqlite://"), capacity)
