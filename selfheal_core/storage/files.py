"""Files backends: snapshots, the learner lease and status records in a directory of the model store.

Snapshots: `<dir>/snapshot-<version:08d>.pt` (what workers read) and
`<dir>/learner-<version:08d>.pt` (the learner's private resume record), each a
SHA-256 hex digest line followed by a `torch.save` payload, written to a temp
file, fsynced, then hard-linked to its final name: `os.link` fails if the name
exists, so two writers never overwrite each other's version; the loser takes
the next number. The private record is linked after its version is claimed: a
learner killed in between leaves a version without one, and resumes from the
version before it. Readers skip files whose digest or payload is bad. Temp
files of a writer killed mid-save are swept at the next save.

The lease is an `flock` on `<dir>/<name>.lock`, released by the kernel when
its holder dies. Status records are `<dir>/status/<member>.pt`, replaced
atomically. Everything is created 0600.
"""
from __future__ import annotations

import errno
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

from selfheal_core.storage.base import Lease, SnapshotStore, StatusBoard, StorageFull, StorageUnavailable

log = logging.getLogger(__name__)

_NAME = re.compile(r"^snapshot-(\d{8})\.pt$")
_TMP = ".tmp-snapshot-"
_STALE_TMP_S = 600.0  # temp files older than this belong to a writer that died


def storage_error(exc: OSError, where: Path) -> StorageFull | StorageUnavailable:
    """An OSError of the model store as the storage error a caller reports: full (no space, no
    inodes, over quota) or unavailable (read-only, permission, anything else), naming where."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space (or no inodes) left in {where}: {exc.strerror}")
    return StorageUnavailable(f"cannot write in {where}: {exc.strerror or exc}")


def _write_atomic(path: Path, data: bytes | tuple[bytes, memoryview], prefix: str, durable: bool = True) -> Path:
    """Write `data` (bytes, or the parts `packed` gives) to a 0600 temp file next to `path` (fsynced
    if `durable`); returns the temp path. Every OSError, creating the temp file included, is a
    StorageError naming the directory."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix)
    except OSError as exc:  # read-only file system, no inodes, no permission
        raise storage_error(exc, path.parent) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            for part in (data,) if isinstance(data, bytes) else data:
                f.write(part)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        os.unlink(tmp)
        raise storage_error(exc, path.parent) from exc
    return Path(tmp)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_FLAT, _TENSOR = "__flat__", "__tensor__"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                                       torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                                       torch.bool)}


def flatten(obj: Any) -> dict[str, Any]:
    """`obj` with its tensors gathered into one flat tensor per dtype, each replaced by
    {"__tensor__": [dtype, offset, shape]}: a published record of a ResNet's last layer and norm
    weights is 42 small tensors, and torch.save's per-tensor entries came to a fifth of their bytes.

    >>> back = unflatten(flatten({"w": {"a": torch.ones(2, 3), "b": torch.arange(4)}, "n": 7}))
    >>> back["w"]["a"].shape, back["w"]["b"].tolist(), back["n"]
    (torch.Size([2, 3]), [0, 1, 2, 3], 7)
    """
    parts: dict[str, list[torch.Tensor]] = {}
    sizes: dict[str, int] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            name = str(value.dtype).removeprefix("torch.")
            if name not in _DTYPES:
                raise ValueError(f"cannot publish a tensor of dtype {value.dtype}")
            offset = sizes.get(name, 0)
            parts.setdefault(name, []).append(value.detach().reshape(-1).cpu())
            sizes[name] = offset + value.numel()
            return {_TENSOR: [name, offset, list(value.shape)]}
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        return value

    skeleton = walk(obj)
    return {_FLAT: {name: torch.cat(ts) for name, ts in parts.items()}, "skeleton": skeleton}


def unflatten(packed: dict[str, Any]) -> Any:
    """The object `flatten` gathered (tensors are copies); ValueError where it does not add up."""
    flats = packed[_FLAT]

    def walk(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {_TENSOR}:
            name, offset, shape = value[_TENSOR]
            flat = flats.get(name)
            n = int(torch.Size(shape).numel())
            if flat is None or flat.dtype != _DTYPES.get(name) or offset < 0 or offset + n > len(flat):
                raise ValueError(f"a packed tensor ({name}, {offset}, {shape}) lies outside its buffer")
            return flat[offset:offset + n].reshape(shape).clone()
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(packed["skeleton"])


def packed(obj: dict[str, Any], flat: bool = False) -> tuple[bytes, memoryview]:
    """(checksum line, torch.save payload) without copying the payload: a learner's private record
    of a 224x224 model carries 64 MB of replayed images, and the payload copied out and joined
    to its checksum held it three times over at every publish. `flat`: tensors gathered per dtype
    (`flatten`), in torch's plain pickle format (no zip directory: a few buffers, not a file per
    tensor), for the small records every worker reads."""
    payload = io.BytesIO()
    if flat:
        torch.save(flatten(obj), payload, _use_new_zipfile_serialization=False)
    else:
        torch.save(obj, payload)
    body = payload.getbuffer()
    return hashlib.sha256(body).hexdigest().encode() + b"\n", body


def pack(obj: dict[str, Any], flat: bool = False) -> bytes:
    """Checksum line and torch.save payload as one blob (a database column); see `packed`."""
    head, body = packed(obj, flat)
    return b"".join((head, body))


def unpack(blob: bytes, what: str) -> dict[str, Any]:
    digest, sep, data = blob.partition(b"\n")
    if not sep or hashlib.sha256(data).hexdigest().encode() != digest:
        raise ValueError(f"{what}: checksum mismatch")
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        return unflatten(obj) if isinstance(obj, dict) and _FLAT in obj else obj
    except Exception as exc:  # unpickling failure of a checksummed file: treat as corrupt
        raise ValueError(f"{what}: unreadable payload ({exc})") from exc


class FileSnapshotStore(SnapshotStore):
    """Versions as files in `directory`; keeps the newest `keep`."""

    def __init__(self, directory: str | os.PathLike, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.location = str(self.directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[int]:
        try:
            found = [_NAME.match(p.name) for p in self.directory.iterdir()]
        except OSError as exc:
            raise StorageUnavailable(f"cannot list {self.directory}: {exc.strerror or exc}") from exc
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, version: int) -> Path:
        return self.directory / f"snapshot-{version:08d}.pt"

    def private_path(self, version: int) -> Path:
        return self.directory / f"learner-{version:08d}.pt"

    def save(self, state: dict[str, Any], meta: dict[str, Any] | None = None,
             private: dict[str, Any] | None = None) -> int:
        parent = self.latest_version()
        blob = pack({"state": state, "meta": dict(meta or {}, parent=parent, created=time.time())}, flat=True)
        self._sweep()
        tmp = _write_atomic(self.path(parent + 1), blob, _TMP)
        private_tmp = None
        try:
            if private is not None:
                private_tmp = _write_atomic(self.path(parent + 1), packed(private), _TMP)
            version = parent + 1
            while True:
                try:
                    os.link(tmp, self.path(version))  # atomic, never overwrites: claims the number
                    break
                except FileExistsError:
                    version += 1
            if private_tmp is not None:
                os.link(private_tmp, self.private_path(version))
            _fsync_dir(self.directory)
        except OSError as exc:  # read-only, no inodes for the link, gone: a storage error, not a crash
            raise storage_error(exc, self.directory) from exc
        finally:
            for t in (tmp, private_tmp):
                if t is not None:
                    try:
                        os.unlink(t)
                    except OSError:
                        pass
        self._prune()
        log.info("snapshot %d written to %s", version, self.directory)
        return version

    def load(self, version: int) -> tuple[dict[str, Any], dict[str, Any]]:
        obj = unpack(self.path(version).read_bytes(), f"snapshot {version}")
        return obj["state"], dict(obj["meta"], version=version)

    def load_private(self, version: int) -> dict[str, Any] | None:
        try:
            blob = self.private_path(version).read_bytes()
        except FileNotFoundError:
            return None
        return unpack(blob, f"learner record {version}")

    def _prune(self) -> None:
        for version in self.versions()[: -self.keep]:
            for path in (self.path(version), self.private_path(version)):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass  # another writer pruned it first, or saved no private record

    def _sweep(self) -> None:
        """Remove temp files left by writers killed mid-save (old enough not to be in use)."""
        now = time.time()
        for p in self.directory.glob(f"{_TMP}*"):
            try:
                if now - p.stat().st_mtime > _STALE_TMP_S:
                    p.unlink()
            except FileNotFoundError:
                pass


class FileLease(Lease):
    """An `flock` on `<directory>/<name>.lock`."""

    def __init__(self, directory: str | os.PathLike, name: str) -> None:
        self.path = Path(directory) / f"{name}.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise storage_error(exc, self.path.parent) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the fd drops the flock
            self._fd = None


class FileStatusBoard(StatusBoard):
    """Status records as files in `<directory>/status/`."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory) / "status"
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, member: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", member):
            raise ValueError(f"bad status member name {member!r}")
        return self.directory / f"{member}.pt"

    def put(self, member: str, payload: dict[str, Any]) -> None:
        path = self._path(member)
        # not fsynced: a status record is rewritten every few seconds, and a torn one fails its checksum
        tmp = _write_atomic(path, pack({"time": time.time(), "payload": payload}), ".tmp-status-", durable=False)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise storage_error(exc, self.directory) from exc

    def read(self, max_age_s: float | None = None) -> dict[str, dict[str, Any]]:
        out, now = {}, time.time()
        for path in self.directory.glob("*.pt"):
            try:
                obj = unpack(path.read_bytes(), str(path))
            except (OSError, ValueError):
                continue  # being replaced, or damaged: the next write fixes it
            if max_age_s is None or now - obj["time"] <= max_age_s:
                out[path.stem] = dict(obj["payload"], _time=obj["time"])
        return out
