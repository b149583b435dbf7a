"""Where a model's shared state lives: feedback log, prediction record, snapshots, lease, status records.

`open_storage(model, directory, url)` picks the backends: with no URL (or a
`sqlite:///path` or file path for the log), SQLite files and a directory
under `directory`; with a `postgresql://` URL, all of it in that database,
so replicas on different machines share no filesystem. Parts open on first
use: a worker never opens the feedback log, so a damaged log cannot stop
inference.
"""
from __future__ import annotations

import threading
from pathlib import Path

from selfheal_core.storage.base import (DISCARDED, HELD, LEARNED, NEW, PAST, QUARANTINED, Deferred, DuplicateFeedback,
                                        Entries, FeedbackLog, Lease, PredictionRecord, Recorded, SnapshotStore,
                                        StatusBoard, StorageError, StorageFull, StorageUnavailable, ascii_safe,
                                        decode_targets, encode_target, parse_pid)
from selfheal_core.storage.files import FileLease, FileSnapshotStore, FileStatusBoard
from selfheal_core.storage.sqlite import SQLiteFeedbackLog, SQLitePredictionRecord

__all__ = ["open_storage", "Storage", "FeedbackLog", "PredictionRecord", "SnapshotStore", "Lease", "StatusBoard",
           "Entries", "Deferred", "DuplicateFeedback",
           "StorageError", "StorageUnavailable", "StorageFull", "ascii_safe",
           "encode_target", "decode_targets", "parse_pid", "SQLiteFeedbackLog", "SQLitePredictionRecord",
           "FileSnapshotStore", "FileLease", "FileStatusBoard", "NEW", "LEARNED", "HELD", "QUARANTINED", "DISCARDED",
           "PAST", "Recorded"]


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("postgresql://", "postgres://"))


class Storage:
    """The shared state of one model; each part is opened once, on first use."""

    def __init__(self, model: str, directory: str | Path, url: str | None = None, keep: int = 5,
                 capacity: int = 10_000, retention_s: float = 30 * 86400.0, record_bytes: int = 2 * 2 ** 30,
                 buffer_bytes: int = 64 * 2 ** 20) -> None:
        self.model = model
        self.directory = Path(directory)  # snapshots, lease and status files (without PostgreSQL)
        self.url = url or None
        self.keep = keep
        self.capacity = capacity  # predictions a writer may hold unwritten
        self.retention_s = retention_s  # how long the record keeps a prediction for feedback by id ...
        self.record_bytes = record_bytes  # ... within this many bytes
        self.buffer_bytes = buffer_bytes  # inputs a writer may hold unwritten, in bytes
        self._parts: dict[str, object] = {}
        self._lock = threading.Lock()

    @property
    def postgres(self) -> bool:
        return is_postgres_url(self.url)

    def _part(self, name: str, make):
        with self._lock:
            if name not in self._parts:
                self._parts[name] = make()
            return self._parts[name]

    @property
    def log(self) -> FeedbackLog:
        def make():
            if self.postgres:
                from selfheal_core.storage.postgres import PostgresFeedbackLog  # psycopg is optional
                return PostgresFeedbackLog(self.url, self.model)
            return SQLiteFeedbackLog(str(self.url).removeprefix("sqlite://") if self.url
                                     else self.directory / "feedback.sqlite")
        return self._part("log", make)

    @property
    def predictions(self) -> PredictionRecord:
        def make():
            if self.postgres:
                from selfheal_core.storage.postgres import PostgresPredictionRecord
                return PostgresPredictionRecord(self.url, self.capacity, self.model, self.retention_s,
                                                self.record_bytes, self.buffer_bytes)
            return SQLitePredictionRecord(self.directory / "predictions.sqlite", self.capacity, self.retention_s,
                                          self.record_bytes, self.buffer_bytes)
        return self._part("predictions", make)

    def opened(self, name: str):
        """The part `name` ("log", "predictions", ...) if it was opened, else None (never opens it)."""
        with self._lock:
            return self._parts.get(name)

    def open_record(self) -> PredictionRecord:
        """The prediction record of a writer (a worker): registered before it hands out ids."""
        record = self.predictions
        record.register()
        return record

    @property
    def snapshots(self) -> SnapshotStore:
        def make():
            if self.postgres:
                from selfheal_core.storage.postgres import PostgresSnapshotStore
                return PostgresSnapshotStore(self.url, self.model, self.keep)
            return FileSnapshotStore(self.directory, self.keep)
        return self._part("snapshots", make)

    @property
    def status(self) -> StatusBoard:
        def make():
            if self.postgres:
                from selfheal_core.storage.postgres import PostgresStatusBoard
                return PostgresStatusBoard(self.url, self.model)
            return FileStatusBoard(self.directory)
        return self._part("status", make)

    def lease(self, name: str) -> Lease:
        """A lease of this model: the same name gives the same object in this process."""
        def make():
            if self.postgres:
                from selfheal_core.storage.postgres import PostgresLease
                return PostgresLease(self.url, self.model, name)
            return FileLease(self.directory, name)
        return self._part(f"lease:{name}", make)

    def describe(self) -> dict:
        where = self.url if not self.postgres else __import__("selfheal_core.storage.postgres",
                                                              fromlist=["redact"]).redact(self.url)
        return {"backend": "postgresql" if self.postgres else "files", "directory": str(self.directory),
                "url": where}

    def close(self) -> None:
        with self._lock:
            parts, self._parts = self._parts, {}
        for part in parts.values():
            for method in ("close", "release"):
                if hasattr(part, method):
                    try:
                        getattr(part, method)()
                    except Exception:  # closing what failed to work: nothing more to do
                        pass
                    break


def open_storage(model: str, directory: str | Path, url: str | None = None, keep: int = 5,
                 capacity: int = 10_000, retention_s: float = 30 * 86400.0, record_bytes: int = 2 * 2 ** 30,
                 buffer_bytes: int = 64 * 2 ** 20) -> Storage:
    return Storage(model, directory, url, keep, capacity, retention_s, record_bytes, buffer_bytes)
