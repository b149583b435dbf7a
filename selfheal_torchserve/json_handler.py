"""A plain TorchServe handler for JSON arrays (no selfheal): tabular rows, small images as lists.

Request bodies: `{"instances": [x, ...]}` (KServe v1), `{"data": x}`, or a bare
array `x` (one input, or a batch when it has one more dimension than an
input). Answers `{"predictions": [...]}` with, per input, `{"label",
"probabilities"}` for classifiers, `{"label", "probability"}` for a binary
logit, `{"value"}` for regression. The input shape and dtype come from the
reference sample in the .mar (`reference_file`), so a single input can be
told from a batch. `SelfHealHandler` is this handler with `SelfHealMixin`.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from ts.torch_handler.base_handler import BaseHandler

from selfheal_core.task import TaskKind
from selfheal_torchserve.batching import per_request
from selfheal_serving.answers import predictions
from selfheal_serving.parsing import json_body, refuse_feedback, request_inputs
from selfheal_serving.settings import HandlerSettings


class JSONArrayHandler(BaseHandler):
    """Numeric JSON in, predictions out; bad input gets a RequestError for that request alone."""

    input_shape: tuple[int, ...] | None = None
    input_dtype: torch.dtype = torch.float32

    def initialize(self, context) -> None:
        self.settings = HandlerSettings.from_yaml((context.model_yaml_config or {}).get("handler"))
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        super().initialize(context)
        ref = Path(context.system_properties["model_dir"]) / self.settings.reference_file
        if self.input_shape is None and ref.exists():
            obj = torch.load(ref, map_location="cpu", weights_only=True)
            inputs = obj["inputs"] if isinstance(obj, dict) else obj
            self.input_shape, self.input_dtype = tuple(inputs.shape[1:]), inputs.dtype

    def handle(self, data: list[dict], context) -> list:
        """Request by request (see batching.py), so one bad request does not fail its batch."""
        start = time.time()
        self.context = context
        if self._is_describe() or self._is_explain():
            return super().handle(data, context)
        outputs = per_request(self, data, context)
        if getattr(context, "metrics", None) is not None:
            context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return outputs

    def preprocess(self, data: list[dict]) -> torch.Tensor:
        return torch.cat([self._inputs(row) for row in data])

    def _inputs(self, row: dict) -> torch.Tensor:
        s = self.settings
        body = json_body(row, s.json_limits, s.max_body_bytes)
        model = getattr(self.context, "model_name", "{model}")
        refuse_feedback(body, f"on the management API: POST /feedback/{model} on the management port, with the "
                              "management key")
        return request_inputs(body, self.input_shape, self.input_dtype, s.max_instances)

    def postprocess(self, data: torch.Tensor) -> dict:
        """The answer to one request: {"predictions": [one entry per input]}."""
        return {"predictions": predictions(data, TaskKind(self.settings.task))}
