"""The TorchServe adapter of the replica runtime: one `WorkerRuntime` per TorchServe worker.

It resolves what a worker knows through TorchServe (the model's name and the
unpacked .mar from the context, the frontend's working directory for
relative snapshot paths), exports through TorchServe's metrics cache, sends
the fields as the `X-Selfheal` header (or the opt-in envelope), and keeps the
model's learner process alive (`LearnerSupervisor`). Serving, monitoring and
following published versions are `selfheal_serving.runtime.ReplicaRuntime`'s.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from selfheal_serving.header import HEADER
from selfheal_serving.runtime import ReplicaRuntime, load_calibration, open_model_storage
from selfheal_serving.settings import HandlerSettings

log = logging.getLogger(__name__)


def server_workdir() -> Path:
    """The TorchServe frontend's working directory (a worker runs in the unpacked .mar)."""
    try:
        return Path(os.readlink(f"/proc/{os.getppid()}/cwd"))
    except OSError:
        return Path(os.environ.get("PWD", os.getcwd()))


class WorkerRuntime(ReplicaRuntime):
    """A replica runtime built from TorchServe's context, with the model's learner supervised."""

    def __init__(self, context, settings: HandlerSettings, model: torch.nn.Module, inputs: torch.Tensor,
                 targets: torch.Tensor | None, handler: Any) -> None:
        self.workdir = server_workdir()
        metrics = None
        if getattr(context, "metrics", None) is not None:
            from selfheal_torchserve.metrics import MetricsEmitter

            metrics = MetricsEmitter(context.metrics, context.model_name)
        self.supervisor = None
        if settings.learner != "off":
            from selfheal_torchserve.supervisor import LearnerSupervisor

            self.supervisor = LearnerSupervisor(self.workdir, context.model_name, context, type(handler), settings)
        super().__init__(context.model_name, settings, model, inputs, targets,
                         open_model_storage(context.model_name, settings, self.workdir),
                         load_calibration(Path(context.system_properties["model_dir"])), metrics,
                         on_status=self.supervisor.tick if self.supervisor is not None else None)

    def start(self, background: bool = True) -> "WorkerRuntime":
        """Start the model's learner process (waiting until it is up), then the runtime."""
        if self.supervisor is not None:
            self.supervisor.tick()
            self.supervisor.wait_ready(60.0)
        return super().start(background)

    def respond(self, context, idx: int, answer: Any, ids: list[str], version: int, drift: dict) -> Any:
        if self.settings.envelope:
            return {"response": answer, "selfheal": {"ids": ids, "model_version": version, "drift": drift,
                                                     "estimated_accuracy": self._estimate}}
        context.set_response_header(idx, HEADER, self.header(ids, version, drift))
        return answer

    def close(self) -> None:
        """Stop the background thread and the supervised learner (tests; TorchServe ends workers by
        killing them)."""
        super().close()
        if self.supervisor is not None:
            self.supervisor.close()
