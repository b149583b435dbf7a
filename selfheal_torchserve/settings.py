"""The `handler:` section of the model-config YAML given to torch-model-archiver, typed.

Deployment-specific locations are not baked into the .mar: the environment
variables SELFHEAL_SNAPSHOT_DIR and SELFHEAL_LOG_URL override `snapshot_dir`
and `log_url` where the server runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from selfheal_core import HealConfig
from selfheal_core.task import TaskKind


@dataclass(frozen=True)
class JsonLimits:
    """Bounds on a JSON request body, so one client cannot exhaust a worker that serves others."""

    max_depth: int = 32  # nesting of arrays and objects
    max_number_chars: int = 64  # digits of one number (Python refuses ints over 4,300 digits anyway)
    max_string_chars: int = 65_536  # one string (base64 images stay well inside the body limit)


@dataclass(frozen=True)
class HandlerSettings:
    task: str = "classification"  # classification | binary (one logit) | regression
    reference_file: str = "reference.pt"  # {"inputs": (R, ...), "labels" or "targets": (R, ...)}, in the .mar
    model_class: str | None = None  # class in the model file; None: the only nn.Module defined there
    model_kwargs: dict = field(default_factory=dict)  # constructor arguments of the model class
    model_factory: str | None = None  # "module:function" returning the model (module in the .mar or installed)
    snapshot_dir: str = "model_store/snapshots"  # relative: to the server's working directory
    snapshot_keep: int = 5  # snapshot versions kept per model
    # Feedback log, prediction ids, snapshots, status: "" = files next to the snapshots (workers and
    # replicas on one machine); "postgresql://user@host:port/db" = shared by replicas anywhere.
    log_url: str = ""
    envelope: bool = False  # put ids, model version and drift in the body ({"response", "selfheal"}), not headers
    max_instances: int = 256  # inputs per request
    max_body_bytes: int = 4 * 1024 * 1024  # raw request body
    json_limits: JsonLimits = field(default_factory=JsonLimits)
    recent_predictions: int = 10_000  # predictions kept for feedback by id
    drain_interval_s: float = 0.2  # how often queued predictions are monitored, off the request path
    # (each drain has a fixed cost: 0.05 s cost 4x more per request at 700 req/s; the drift header
    # lags by at most this)
    sync_interval_s: float = 0.5  # how often a worker looks for a newer published version (a listing)
    status_interval_s: float = 2.0  # how often a worker writes its status record, reads the learner's and
    # checks that the learner process runs
    torch_threads: int | None = None  # intra-op threads per worker (None: leave torch's setting)
    learner: Literal["auto", "external", "off"] = "auto"  # auto: the workers start and supervise one learner
    # process per model; external: `selfheal learn` runs elsewhere (several machines); off: no learning
    learner_threads: int = 1  # torch threads of the learner process
    learner_nice: int = 19  # niceness of the learner process: serving keeps the CPU when it is short
    # (bench_serve at batch 1 with 5% feedback: label-to-weights p99 2.2 s at 19, the same order as at 10)
    feedback_wait_s: float = 5.0  # how long feedback by id waits for an id a worker has not recorded yet
    heal: HealConfig = field(default_factory=HealConfig)

    @classmethod
    def from_yaml(cls, section: dict | None) -> "HandlerSettings":
        section = dict(section or {})
        valid = {f.name for f in fields(cls)}
        unknown = set(section) - valid
        if unknown:
            raise ValueError(f"unknown selfheal handler settings {sorted(unknown)}; valid: {sorted(valid)}")
        heal = section.get("heal")
        section["heal"] = (HealConfig(adapt=False) if heal is False else HealConfig.from_dict(heal))
        if isinstance(section.get("json_limits"), dict):
            section["json_limits"] = JsonLimits(**section["json_limits"])
        if os.environ.get("SELFHEAL_SNAPSHOT_DIR"):
            section["snapshot_dir"] = os.environ["SELFHEAL_SNAPSHOT_DIR"]
        if os.environ.get("SELFHEAL_LOG_URL"):  # deployment-specific, like the store: not baked into the .mar
            section["log_url"] = os.environ["SELFHEAL_LOG_URL"]
        settings = cls(**section)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.task not in {k.value for k in TaskKind}:
            raise ValueError(f"handler setting task must be one of {[k.value for k in TaskKind]}, got {self.task!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError("handler setting model_kwargs must be a mapping of constructor arguments")
        if self.model_factory is not None and ":" not in self.model_factory:
            raise ValueError(f"handler setting model_factory must be 'module:function', got {self.model_factory!r}")
        if self.learner not in ("auto", "external", "off"):
            raise ValueError(f"handler setting learner must be auto, external or off, got {self.learner!r}")
        for name in ("max_instances", "max_body_bytes", "recent_predictions", "snapshot_keep"):
            if not getattr(self, name) > 0:
                raise ValueError(f"handler setting {name} must be > 0")
        for name in ("drain_interval_s", "sync_interval_s", "status_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"handler setting {name} must be > 0")

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)
