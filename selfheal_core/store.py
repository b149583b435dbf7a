"""Versioned, atomic, checksummed snapshots in a directory of the model store.

File layout: `<dir>/snapshot-<version:08d>.pt`, each holding a SHA-256 hex
digest line followed by a `torch.save` payload. A snapshot is written to a
temp file, fsynced, then hard-linked to its final name: `os.link` fails if
the name exists, so two writers (workers, replicas) never overwrite each other's
version; the loser takes the next number. Readers skip files whose digest or
payload is bad and fall back to the previous version.

Many workers (processes) and replicas on one machine share a store: one of
them holds the publisher lease (an `flock` on `publisher.lock`, released by
the kernel when its holder dies, so another worker takes over) and publishes;
the others load what it publishes.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^snapshot-(\d{8})\.pt$")


class SnapshotStore:
    """Save and load healer states by version; keeps the newest `keep` files."""

    def __init__(self, directory: str | os.PathLike, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lease: int | None = None  # fd holding the publisher lock

    def try_lease(self) -> bool:
        """Become (or stay) the one publisher of this store; False while another process is."""
        if self._lease is not None:
            return True
        fd = os.open(self.directory / "publisher.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lease = fd
        log.info("publisher lease taken for %s (pid %d)", self.directory, os.getpid())
        return True

    @property
    def is_publisher(self) -> bool:
        return self._lease is not None

    def release_lease(self) -> None:
        if self._lease is not None:
            os.close(self._lease)  # closing the fd drops the flock
            self._lease = None

    def versions(self) -> list[int]:
        """Versions present on disk (valid or not), ascending."""
        found = (_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, version: int) -> Path:
        return self.directory / f"snapshot-{version:08d}.pt"

    def save(self, state: dict[str, Any], meta: dict[str, Any] | None = None) -> int:
        """Write a new version atomically; returns its number."""
        payload = io.BytesIO()
        parent = self.versions()[-1] if self.versions() else 0
        torch.save({"state": state, "meta": dict(meta or {}, parent=parent, created=time.time())}, payload)
        data = payload.getvalue()
        blob = hashlib.sha256(data).hexdigest().encode() + b"\n" + data
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-snapshot-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            version = parent + 1
            while True:
                try:
                    os.link(tmp, self.path(version))  # atomic, never overwrites
                    break
                except FileExistsError:
                    version += 1
        finally:
            os.unlink(tmp)
        self._fsync_dir()
        self._prune()
        log.info("snapshot %d written to %s", version, self.directory)
        return version

    def load(self, version: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, meta) of one version; ValueError if the file is corrupt."""
        blob = self.path(version).read_bytes()
        digest, sep, data = blob.partition(b"\n")
        if not sep or hashlib.sha256(data).hexdigest().encode() != digest:
            raise ValueError(f"snapshot {version}: checksum mismatch")
        try:
            obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:  # unpickling failure of a checksummed file: treat as corrupt
            raise ValueError(f"snapshot {version}: unreadable payload ({exc})") from exc
        return obj["state"], dict(obj["meta"], version=version)

    def load_latest(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The newest valid snapshot, skipping corrupt ones; None if there is none."""
        for version in reversed(self.versions()):
            try:
                return self.load(version)
            except (ValueError, OSError) as exc:
                log.warning("skipping snapshot %d: %s", version, exc)
        return None

    def latest_version(self) -> int:
        """Highest version number on disk (cheap: a directory listing); 0 if none."""
        versions = self.versions()
        return versions[-1] if versions else 0

    def _prune(self) -> None:
        for version in self.versions()[: -self.keep]:
            try:
                self.path(version).unlink()
            except FileNotFoundError:
                pass  # another writer pruned it first

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
