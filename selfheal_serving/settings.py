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


def _whole(obj: Any, name: str, low: int, high: int) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{_where(obj)}{name} must be an integer in [{low}, {high}], got {value!r}")


def _real(obj: Any, name: str, low: float, high: float) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{_where(obj)}{name} must be a number in [{low:g}, {high:g}], got {value!r}")


def _where(obj: Any) -> str:
    return "handler setting json_limits." if isinstance(obj, JsonLimits) else "handler setting "


def _mapping(kind: type, value: Any, what: str) -> dict:
    """A YAML section as keyword arguments of `kind`: a mapping of its fields, unknown keys named."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping of settings, got {type(value).__name__}")
    valid = {f.name for f in fields(kind)}
    unknown = set(value) - valid
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(map(str, unknown))}; valid: {sorted(valid)}")
    return dict(value)


@dataclass(frozen=True)
class JsonLimits:
    """Bounds on a JSON request body, so one client cannot exhaust a worker that serves others."""

    max_depth: int = 32  # nesting of arrays and objects
    max_number_chars: int = 64  # digits of one number (Python refuses ints over 4,300 digits anyway)
    max_string_chars: int = 65_536  # one string (base64 images stay well inside the body limit)

    def __post_init__(self) -> None:
        _whole(self, "max_depth", 1, 1_000)
        _whole(self, "max_number_chars", 1, 4_300)
        _whole(self, "max_string_chars", 1, 1 << 30)

    @classmethod
    def from_dict(cls, value: Any) -> "JsonLimits":
        return cls(**_mapping(cls, value, "handler setting json_limits"))


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
    recent_predictions: int = 10_000  # predictions a worker holds in memory until written to the record
    # The prediction record (what feedback by id resolves): kept this many seconds (labels days late:
    # chargebacks, failures) within this many bytes on disk or in PostgreSQL, the oldest going first.
    # A digits row is ~450 bytes (4.7M predictions in 2 GiB), a 3x224x224 float input ~600 kB (3,500):
    # GET /feedback/<model> says how far back the record reaches ("record": "reaches_back_s").
    feedback_retention: float = 30 * 86_400.0
    record_bytes: int = 2 * 2 ** 30
    record_buffer_bytes: int = 64 * 2 ** 20  # inputs a worker holds until written (then the oldest are dropped,
    # counted in selfheal_dropped{Buffer="record"}: only while the record cannot be written)
    # Queued predictions are monitored (drift, label-free correction, the live estimate) off the request
    # path once heal.observe_every of them are queued, and at least this often. A drain has a fixed cost
    # (in process, digits CNN: about 2 ms, as much as its 128 samples' own), yet 1 s instead of 0.2 cost
    # the 224x224 ResNet more worker CPU per request in bench_serve (1.12-1.13x plain against
    # 1.04-1.05, two runs each), and gained the digits CNN less than the machine's noise (1.13-1.22
    # against 1.23 at 1x1). The drift header and the estimate lag by at most this.
    drain_interval_s: float = 0.2
    record_interval_s: float = 0.2  # how often answered ids are written to the prediction record:
    # feedback by id for an answer resolves at most this long after it (and waits feedback_wait_s for it)
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
    custom: dict = field(default_factory=dict)  # your own handler's settings: passed through untouched (the
    # handler reads them as `self.selfheal_settings.custom`); selfheal checks every other key
    heal: HealConfig = field(default_factory=HealConfig)

    def __post_init__(self) -> None:
        self.validate()  # checked whole at construction, however it was built

    @classmethod
    def from_yaml(cls, section: dict | None) -> "HandlerSettings":
        try:
            section = _mapping(cls, section, "selfheal handler settings")
        except ValueError as exc:
            raise ValueError(f"{exc} (settings of your own handler go under handler.custom)") from None
        heal = section.get("heal")
        if heal is not None and heal is not False and not isinstance(heal, dict):
            raise ValueError(f"handler setting heal must be a mapping (or false), got {type(heal).__name__}")
        section["heal"] = (HealConfig(adapt=False) if heal is False else HealConfig.from_dict(heal))
        if "json_limits" in section:
            section["json_limits"] = JsonLimits.from_dict(section["json_limits"])
        if os.environ.get("SELFHEAL_SNAPSHOT_DIR"):
            section["snapshot_dir"] = os.environ["SELFHEAL_SNAPSHOT_DIR"]
        if os.environ.get("SELFHEAL_LOG_URL"):  # deployment-specific, like the store: not baked into the .mar
            section["log_url"] = os.environ["SELFHEAL_LOG_URL"]
        settings = cls(**section)
        settings.validate()
        return settings

    def validate(self) -> None:
        """ValueError naming the first setting out of its range or of the wrong type."""
        for name in ("task", "reference_file", "snapshot_dir", "log_url", "learner"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"handler setting {name} must be a string, got {getattr(self, name)!r}")
        for name in ("model_class", "model_factory"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"handler setting {name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.envelope, bool):
            raise ValueError(f"handler setting envelope must be true or false, got {self.envelope!r}")
        if not isinstance(self.json_limits, JsonLimits) or not isinstance(self.heal, HealConfig):
            raise ValueError("handler settings json_limits and heal must be mappings of their settings")
        if not isinstance(self.custom, dict):
            raise ValueError(f"handler setting custom must be a mapping, got {type(self.custom).__name__}")
        ref = self.reference_file.replace("\\", "/")
        if not ref or ref.startswith("/") or ".." in ref.split("/"):
            raise ValueError(f"handler setting reference_file must be a path inside the .mar (relative, no '..'), "
                             f"got {self.reference_file!r}")
        _whole(self, "snapshot_keep", 1, 1_000)
        _whole(self, "max_instances", 1, 1_000_000)
        _whole(self, "max_body_bytes", 1, 1 << 31)
        _whole(self, "recent_predictions", 1, 100_000_000)
        _real(self, "feedback_retention", 1, 10 * 365 * 86_400)
        _whole(self, "record_bytes", 2 ** 20, 1 << 50)
        _whole(self, "record_buffer_bytes", 2 ** 16, 1 << 40)
        _whole(self, "learner_threads", 1, 1_024)
        _whole(self, "learner_nice", 0, 19)
        if self.torch_threads is not None:
            _whole(self, "torch_threads", 1, 1_024)
        for name in ("drain_interval_s", "record_interval_s", "sync_interval_s", "status_interval_s"):
            _real(self, name, 0.01, 3_600)  # below 10 ms a background loop only burns the CPU it serves with
        _real(self, "feedback_wait_s", 0, 600)
        if self.task not in {k.value for k in TaskKind}:
            raise ValueError(f"handler setting task must be one of {[k.value for k in TaskKind]}, got {self.task!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError("handler setting model_kwargs must be a mapping of constructor arguments")
        if self.model_factory is not None and ":" not in self.model_factory:
            raise ValueError(f"handler setting model_factory must be 'module:function', got {self.model_factory!r}")
        if self.learner not in ("auto", "external", "off"):
            raise ValueError(f"handler setting learner must be auto, external or off, got {self.learner!r}")

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)
