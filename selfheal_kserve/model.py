"""`SelfHealModel`: a `kserve.Model` that serves and heals a selfheal archive.

v1 (`POST /v1/models/{name}:predict`, `{"instances": [...]}`) answers
`{"predictions": [...]}` as TorchServe's stock handler does; the Open
Inference Protocol v2 (REST `POST /v2/models/{name}/infer` and gRPC
`ModelInfer`) takes one FP32 (or the reference's dtype) input tensor and
answers the model's outputs as a tensor (`logits`, or `values` for
regression). Every answer carries the prediction ids, version and drift: the
`X-Selfheal` header on REST, and on v2 the response `parameters` as well
(`selfheal_ids` comma-separated, `model_version`, `drift`), where gRPC
clients read them. Bad input is that request's alone, with the code TorchServe
gives (400, 413, ...; gRPC: INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...).

KServe calls a sync `predict` on its event loop: one request at a time per
server process, as the runtime's lock would allow anyway. Learning happens in
the model's learner process (`selfheal kserve-learner` / `deploy/kserve/`);
the servers follow the versions it publishes.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any

import kserve
import numpy as np
import torch
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from selfheal_core.errors import ClientError
from selfheal_core.task import TaskKind
from selfheal_serving.answers import predictions
from selfheal_serving.bundle import ModelBundle
from selfheal_serving.header import HEADER
from selfheal_serving.parsing import refuse_feedback, request_inputs, shaped
from selfheal_serving.runtime import ReplicaRuntime

log = logging.getLogger(__name__)

class SelfHealModel(kserve.Model):
    """One KServe model: a `ReplicaRuntime` over the archive's model, with a background thread."""

    def __init__(self, bundle: ModelBundle, storage, background: bool = True) -> None:
        super().__init__(bundle.name, return_response_headers=True)
        self.bundle = bundle
        self._storage = storage
        self._background = background
        self.runtime: ReplicaRuntime | None = None
        self.kind = TaskKind(bundle.settings.task)

    def load(self) -> bool:
        b = self.bundle
        if b.settings.torch_threads:
            torch.set_num_threads(b.settings.torch_threads)
        self.runtime = ReplicaRuntime(b.name, b.settings, b.model, b.inputs, b.targets, self._storage,
                                      b.calibration, member=f"kserve-{uuid.uuid4().hex[:8]}")
        self.runtime.start(background=self._background)
        self.ready = True
        return self.ready

    def stop(self) -> None:
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None

    # ------------------------------------------------------------------ requests
    def predict(self, payload: Any, headers: dict | None = None, response_headers: dict | None = None):
        v2 = isinstance(payload, InferRequest)
        try:
            x = self.runtime.check(self._inputs(payload))
        except ClientError as err:
            raise _client_error(err, grpc=v2 and payload.from_grpc) from None
        outputs, fields = self.runtime.serve(x)
        if response_headers is not None:
            response_headers[HEADER] = fields["header"]
        if not v2:
            return {"predictions": predictions(outputs, self.kind)}
        out = outputs.detach().float().cpu().numpy()
        name = "values" if self.kind is TaskKind.REGRESSION else "logits"
        tensor = InferOutput(name=name, shape=list(out.shape), datatype="FP32")
        tensor.set_data_from_numpy(out, binary_data=False)
        parameters = {"selfheal_ids": ",".join(fields["ids"]), "model_version": int(fields["model_version"]),
                      "drift": "unknown" if fields["drift"] is None else str(fields["drift"]).lower()}
        return InferResponse(response_id=payload.id or uuid.uuid4().hex, model_name=self.name,
                             infer_outputs=[tensor], from_grpc=payload.from_grpc, parameters=parameters)

    def _inputs(self, payload: Any) -> torch.Tensor:
        ref = self.bundle.inputs
        shape, limit = tuple(ref.shape[1:]), self.bundle.settings.max_instances
        if isinstance(payload, InferRequest):
            if len(payload.inputs) != 1:
                raise ClientError(400, f"one input tensor expected, got {len(payload.inputs)}")
            try:
                array = payload.inputs[0].as_numpy()
            except Exception as exc:  # a malformed tensor (data and shape disagree, unknown datatype)
                raise ClientError(400, f"input tensor cannot be read: {type(exc).__name__}: {exc}") from None
            if array.dtype == np.bool_ or array.dtype.kind not in "fiu":
                raise ClientError(400, f"input tensor must be numeric, got {payload.inputs[0].datatype}")
            if len(array) > limit:
                raise ClientError(413, f"{len(array)} inputs exceed the limit of {limit}")
            # NaN and inf are refused by the runtime's check, as on every server
            return shaped(torch.from_numpy(np.ascontiguousarray(array)).to(ref.dtype), shape, batch=True)
        refuse_feedback(payload, f"by the learner: POST /feedback/{self.name} there, with the management key")
        return request_inputs(payload, shape, ref.dtype, limit)

    def describe(self) -> dict:
        return self.runtime.describe()


_GRPC = {400: "InvalidArgument", 403: "PermissionDenied", 404: "NotFound", 409: "FailedPrecondition",
         413: "ResourceExhausted", 422: "InvalidArgument", 429: "ResourceExhausted"}


def _client_error(err: ClientError, grpc: bool) -> Exception:
    """The error a KServe protocol answers with the client error's code (REST: the HTTP status and
    `{"code", "type", "message"}`; gRPC: the matching status code)."""
    if grpc:
        from grpc_interceptor import exceptions

        return getattr(exceptions, _GRPC.get(err.code, "InvalidArgument"))(err.message)
    return err

