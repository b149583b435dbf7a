"""SelfHealMixin: drop selfheal into any TorchServe handler.

    from selfheal_torchserve import SelfHealMixin
    from ts.torch_handler.image_classifier import ImageClassifier

    class MyHandler(SelfHealMixin, ImageClassifier):
        pass

TorchServe's contract stays: the base class's `preprocess` turns a request
(image bytes, text, JSON) into a tensor, selfheal serves and heals inside
`inference`, the base class's `postprocess` shapes the answer. What the mixin
changes:
- `preprocess` runs once per request, so a request that cannot be read (a
  `RequestError` the base raises, or any exception) is answered with a 4xx
  alone while the rest of the batch is served;
- `postprocess` runs once per request on that request's outputs (a list of one
  entry for a one-input request is unwrapped, as TorchServe answers it);
- by default the response body is the base's; prediction ids, model version
  and drift go into one response header (`X-Selfheal`), or into the body with
  `envelope: true`: `{"response": <the base's answer>, "selfheal": {...}}`;
- the eager model is built from `model_kwargs` / `model_factory` / `model_class`;
- `describe` (GET /models/{m}?customized=true) answers selfheal's status.
`HandlerTime`, the explain path and TorchScript loading are BaseHandler's.
Feedback never reaches a worker: the management-port plugin sends it to the
model's learner process (see `selfheal_torchserve.learner_service`).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from selfheal_torchserve.batching import per_request
from selfheal_serving.loading import build_model, load_reference
from selfheal_serving.settings import HandlerSettings

log = logging.getLogger(__name__)

ROLE_ENV = "SELFHEAL_ROLE"  # "learner" in the learner process: load the model, do not serve
BACKGROUND_ENV = "SELFHEAL_BACKGROUND"  # "0": no background thread; the caller steps the runtime (tests)


class SelfHealMixin:
    """Put first in the bases: `class MyHandler(SelfHealMixin, SomeBaseHandlerSubclass)`."""

    selfheal = None  # the WorkerRuntime, once initialised (None in the learner process)

    # ------------------------------------------------------------------ loading
    def initialize(self, context) -> None:
        self.selfheal_settings = settings = HandlerSettings.from_yaml(
            (context.model_yaml_config or {}).get("handler"))
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        super().initialize(context)
        model = getattr(self.model, "_orig_mod", self.model)  # torch.compile's wrapper: serve the module itself
        if not isinstance(model, torch.nn.Module):
            raise RuntimeError(f"selfheal serves torch.nn.Module models (eager or TorchScript); this .mar loads "
                               f"{type(model).__name__}")
        self.model = model
        model_dir = Path(context.system_properties["model_dir"])
        inputs, targets = load_reference(model_dir / settings.reference_file)
        if os.environ.get(ROLE_ENV) == "learner":
            self.selfheal_parts = (model, inputs, targets)  # the learner process builds its side from these
            self.initialized = True
            return
        from selfheal_torchserve.worker import WorkerRuntime  # worker-only machinery

        self.selfheal = WorkerRuntime(context, settings, model, inputs, targets, handler=self)
        self.selfheal.start(background=os.environ.get(BACKGROUND_ENV, "1") != "0")
        self.initialized = True

    def _load_pickled_model(self, model_dir, model_file, model_pt_path):
        """BaseHandler's eager-model loader, with constructor arguments or a factory. A base class of
        the user's own that loads its model itself keeps doing so (the mixin comes first in the MRO
        and used to replace it silently)."""
        own = _own_loader(type(self))
        if own is not None:
            log.info("the model is loaded by %s._load_pickled_model (your handler's own loader)", own.__qualname__)
            return super()._load_pickled_model(model_dir, model_file, model_pt_path)
        return build_model(model_dir, model_file, model_pt_path, self.selfheal_settings, self.device)

    # ------------------------------------------------------------------ requests
    def handle(self, data: list[dict], context) -> list[Any]:
        start = time.time()
        self.context = context
        if self._is_explain():
            return super().handle(data, context)  # BaseHandler's explain path, HandlerTime included
        if self._is_describe():
            output = [self.describe_handle()]
        else:
            output = self._serve(data, context)
        if getattr(context, "metrics", None) is not None:
            context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return output

    def _serve(self, data: list[dict], context) -> list[Any]:
        rt = self.selfheal
        recorded: dict[str, Any] = {}

        def answer(idx: int, response: Any, rows: slice, outs: torch.Tensor, inputs: torch.Tensor) -> Any:
            if not recorded:  # once per batch: ids for every input, the version and drift served
                recorded.update(ids=rt.record(inputs, outs), version=rt.version, drift=rt.drift, answered=0)
            recorded["answered"] += 1
            return rt.respond(context, idx, response, recorded["ids"][rows], recorded["version"], recorded["drift"])

        outputs = per_request(self, data, context, rt.check, answer)
        rt.note_batch(len(data), recorded.get("answered", 0))
        return outputs

    def inference(self, data: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The served model's (corrected) outputs; monitoring and adaptation follow off the request path.
        Not under torch.inference_mode (BaseHandler's choice): adapting needs normal tensors."""
        return self.selfheal.predict(data)

    # ------------------------------------------------------------------ status
    def describe_handle(self) -> str:
        return json.dumps(self.selfheal.describe())


def _own_loader(cls: type) -> type | None:
    """The first class after SelfHealMixin in cls's MRO that defines `_load_pickled_model` itself,
    unless it is TorchServe's BaseHandler (whose loader the mixin extends)."""
    mro = cls.__mro__
    after = mro[mro.index(SelfHealMixin) + 1:]
    owner = next((c for c in after if "_load_pickled_model" in vars(c)), None)
    if owner is None or owner.__module__.startswith("ts."):
        return None
    return owner
