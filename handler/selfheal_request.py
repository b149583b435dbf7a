"""Request side of the selfheal TorchServe handler: settings, parsing and validation.

Shipped next to selfheal_handler.py in the .mar (--extra-files): TorchServe
requires the handler module itself to define exactly one class.
"""
from __future__ import annotations

import hashlib
import hmac
import importlib.util
import inspect
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfheal_core import HealConfig


@dataclass(frozen=True)
class HandlerSettings:
    """The `handler:` section of the model-config YAML given to torch-model-archiver."""

    model_class: str | None = None  # class in the model file; None: the only nn.Module defined there
    reference_file: str = "reference.pt"  # {"inputs": (R, ...), "labels": (R,) optional}, in the .mar
    snapshot_dir: str = "model_store/snapshots"  # relative: to the server's working directory
    snapshot_keep: int = 5  # snapshot files kept per model
    # Feedback log and prediction ids: "" = SQLite files next to the snapshots (shared by workers and
    # replicas on one machine); "postgresql://user@host:port/db" = shared by replicas anywhere.
    log_url: str = ""
    feedback_secret_env: str = "SELFHEAL_FEEDBACK_SECRET"  # credential key when token authorization is off
    credential_header: str = "X-Selfheal-Feedback"  # set by the management-port plugin (case-insensitive)
    max_instances: int = 256  # inputs per request
    max_body_bytes: int = 4 * 1024 * 1024  # raw request body
    recent_predictions: int = 10_000  # ids kept for feedback by id
    sync_interval_s: float = 1.0  # how often a worker joins up with the others (new versions, log rows)
    drain_interval_s: float = 0.2  # how often queued predictions are monitored, off the request path
    # (each drain has a fixed cost: 0.05 s cost 4x more per request at 700 req/s; responses' drift
    # field lags by at most this)
    gil_switch_interval_s: float = 0.0005  # sys.setswitchinterval in the worker: how long the request
    # thread may wait for the GIL while the background thread learns (Python's default 5 ms set p99)
    background: bool = True  # monitoring and learning in a background thread (False: in the request)
    torch_threads: int = 1  # intra-op threads per worker: small models gain nothing from more, and
    # several workers (or the JVM) on few cores slowed a labelled update ~15x by oversubscription
    heal: HealConfig = field(default_factory=HealConfig)

    @classmethod
    def from_yaml(cls, section: dict | None) -> "HandlerSettings":
        section = dict(section or {})
        valid = {f.name for f in fields(cls)}
        unknown = set(section) - valid
        if unknown:
            raise ValueError(f"unknown handler settings {sorted(unknown)}; valid: {sorted(valid)}")
        section["heal"] = HealConfig.from_dict(section.get("heal"))
        if os.environ.get("SELFHEAL_SNAPSHOT_DIR"):
            section["snapshot_dir"] = os.environ["SELFHEAL_SNAPSHOT_DIR"]
        if os.environ.get("SELFHEAL_LOG_URL"):  # deployment-specific, like the store: not baked into the .mar
            section["log_url"] = os.environ["SELFHEAL_LOG_URL"]
        return cls(**section)


class RequestError(Exception):
    """A client error: answered with `code` and `message`, nothing applied."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def server_workdir() -> Path:
    """The TorchServe frontend's working directory (a worker runs in the unpacked .mar)."""
    try:
        return Path(os.readlink(f"/proc/{os.getppid()}/cwd"))
    except OSError:
        return Path(os.environ.get("PWD", os.getcwd()))


def feedback_credential(model_name: str, secret_env: str) -> str | None:
    """The internal credential the feedback plugin sends: HMAC-SHA256 over "selfheal-feedback/{model}"
    keyed by the management key of TorchServe's key_file.json (new at every server start), or by
    the `secret_env` variable when token authorization is off. None: feedback is disabled.

    Read on every call: TorchServe may rotate its keys while running.
    """
    key_file = server_workdir() / "key_file.json"
    try:
        key = json.loads(key_file.read_text())["management"]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        key = os.environ.get(secret_env) or None
    if not key:
        return None
    return hmac.new(key.encode(), f"selfheal-feedback/{model_name}".encode(), hashlib.sha256).hexdigest()


def load_model(model_dir: Path, manifest: dict, class_name: str | None) -> nn.Module:
    """Instantiate the model class from the .mar's model file and load its state_dict."""
    spec_model = manifest.get("model", {})
    model_file, weights = spec_model.get("modelFile"), spec_model.get("serializedFile")
    if not model_file or not weights:
        raise RuntimeError("the .mar needs --model-file and --serialized-file (a state_dict)")
    spec = importlib.util.spec_from_file_location(Path(model_file).stem, model_dir / model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, nn.Module) and c.__module__ == module.__name__]
    if class_name:
        classes = [c for c in classes if c.__name__ == class_name]
    if len(classes) != 1:
        raise RuntimeError(f"cannot pick a model class in {model_file}: {[c.__name__ for c in classes]}")
    model = classes[0]()
    model.load_state_dict(torch.load(model_dir / weights, map_location="cpu", weights_only=True))
    return model.eval()


def header(context, idx: int, name: str) -> str | None:
    """Request header by case-insensitive name (TorchServe passes them case-sensitively)."""
    for key, value in (context.get_all_request_header(idx) or {}).items():
        if key.lower() == name.lower():
            return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
    return None


def body_json(row: dict, max_bytes: int) -> Any:
    """The request body as parsed JSON; TorchServe hands over bytes or already-decoded JSON."""
    body = row.get("body", row.get("data"))
    if isinstance(body, (bytes, bytearray)):
        if len(body) > max_bytes:
            raise RequestError(413, f"request body of {len(body)} bytes exceeds the limit of {max_bytes}")
        try:
            body = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(400, 'body must be a JSON object: {"instances": [...]} or {"data": x}')
    return body


def label_list(values: Any, num_classes: int, what: str) -> torch.Tensor:
    """Integer labels in [0, num_classes) as a LongTensor; RequestError otherwise."""
    if not isinstance(values, list) or not values:
        raise RequestError(400, f"{what} must be a non-empty list of integer labels")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise RequestError(400, f"{what}: label {v!r} is not an integer")
        if not 0 <= v < num_classes:
            raise RequestError(422, f"{what}: label {v} out of range [0, {num_classes - 1}]")
    return torch.tensor(values, dtype=torch.long)
