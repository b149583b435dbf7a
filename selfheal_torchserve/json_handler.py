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

import math
import time
from pathlib import Path

import torch
from ts.torch_handler.base_handler import BaseHandler

from selfheal_core.task import TaskKind
from selfheal_torchserve.batching import per_request
from selfheal_torchserve.errors import RequestError
from selfheal_torchserve.parsing import as_tensor, json_body
from selfheal_torchserve.settings import HandlerSettings


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
        if isinstance(body, dict) and {"feedback", "labels", "targets"} & set(body):
            model = getattr(self.context, "model_name", "{model}")
            raise RequestError(403, f"feedback is taken on the management API: POST /feedback/{model} on the "
                                    "management port, with the management key")
        if isinstance(body, dict):
            if "instances" in body:
                instances = body["instances"]
                if not isinstance(instances, list) or not instances:
                    raise RequestError(400, '"instances" must be a non-empty list of inputs')
                if len(instances) > s.max_instances:
                    raise RequestError(413, f"{len(instances)} inputs exceed the limit of {s.max_instances}")
                return self._shaped(as_tensor(instances, self.input_dtype), batch=True)
            for key in ("data", "input", "inputs"):
                if key in body:
                    return self._shaped(as_tensor(body[key], self.input_dtype), batch=False)
            raise RequestError(400, 'body needs "instances": [x, ...] or "data": x')
        if isinstance(body, list):
            return self._shaped(as_tensor(body, self.input_dtype), batch=None)
        raise RequestError(400, 'body must be a JSON array or object: {"instances": [...]} or {"data": x}')

    def _shaped(self, x: torch.Tensor, batch: bool | None) -> torch.Tensor:
        """x as (N, *input_shape): a single input gains the batch dimension; unit dimensions the
        input shape has (an 8x8 image for a (1, 8, 8) model) are added."""
        shape = self.input_shape
        if shape is None:
            return x if batch else x.unsqueeze(0)
        squeezed = tuple(d for d in shape if d != 1)
        if batch is not False and tuple(x.shape[1:]) in (shape, squeezed) and x.dim() >= 1:
            out = x.reshape(len(x), *shape)
        elif batch is not True and tuple(x.shape) in (shape, squeezed):
            out = x.reshape(1, *shape)
        else:
            raise RequestError(400, f"inputs must have shape {list(shape)} (or a list of them), got "
                                    f"{list(x.shape[1:] if batch else x.shape)}")
        if len(out) > self.settings.max_instances:
            raise RequestError(413, f"{len(out)} inputs exceed the limit of {self.settings.max_instances}")
        if out.is_floating_point() and not math.isfinite(float(out.sum())) and not torch.isfinite(out).all():
            raise RequestError(400, "inputs contain NaN or inf")
        return out

    def postprocess(self, data: torch.Tensor) -> dict:
        """The answer to one request: {"predictions": [one entry per input]}."""
        kind = TaskKind(self.settings.task)
        out = data.detach().float().cpu()
        if kind is TaskKind.CLASSIFICATION:
            probs = torch.softmax(out, 1)
            entries = [{"label": int(p.argmax()), "probabilities": [round(float(v), 6) for v in p]} for p in probs]
        elif kind is TaskKind.BINARY:
            probs = torch.sigmoid(out.reshape(len(out)))
            entries = [{"label": int(p > 0.5), "probability": round(float(p), 6)} for p in probs]
        else:
            values = out.reshape(len(out), -1)
            entries = [{"value": float(v[0]) if len(v) == 1 else [float(t) for t in v]} for v in values]
        return {"predictions": entries}

