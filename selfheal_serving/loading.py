"""Loading what a .mar holds: the model (TorchServe's formats) and the reference sample.

`BaseHandler.initialize` picks the format: a model file plus serialized
weights is an eager model (built here: constructor arguments from
`model_kwargs`, a `module:function` factory, or the class named by
`model_class`); a `.pt` without a model file is TorchScript
(`torch.jit.load`). Errors name the setting that fixes them.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfheal_serving.settings import HandlerSettings

log = logging.getLogger(__name__)


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise RuntimeError(f"cannot import {name!r} ({exc}): ship it in the .mar with --extra-files or install "
                           "it where TorchServe runs") from exc


def build_model(model_dir: str | Path, model_file: str, weights: str | None, settings: HandlerSettings,
                device: torch.device | str | None = None) -> nn.Module:
    """The eager model of a .mar: constructed as the settings say, then its state_dict loaded."""
    if settings.model_factory:
        module_name, func_name = settings.model_factory.split(":", 1)
        factory = getattr(_import(module_name), func_name, None)
        if factory is None:
            raise RuntimeError(f"model_factory {settings.model_factory!r}: {module_name} has no {func_name}")
        make, what = factory, f"model_factory {settings.model_factory}"
    else:
        module = _import(Path(model_file).stem)
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
                   if issubclass(c, nn.Module) and c.__module__ == module.__name__]
        if settings.model_class:
            classes = [c for c in classes if c.__name__ == settings.model_class]
        if len(classes) != 1:
            raise RuntimeError(f"cannot pick the model class in {model_file}: found {[c.__name__ for c in classes]}; "
                               "set model_class (or model_factory) in the handler section of the model-config yaml")
        make, what = classes[0], classes[0].__name__
    try:
        model = make(**settings.model_kwargs)
    except TypeError as exc:
        raise RuntimeError(f"{what}({', '.join(f'{k}=...' for k in settings.model_kwargs)}) failed: {exc}; give the "
                           "constructor arguments as model_kwargs in the handler section of the model-config "
                           "yaml, or as --model-kwargs '{...}' to the selfheal command (or a model_factory)") from exc
    if not isinstance(model, nn.Module):
        raise RuntimeError(f"{what} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        state = torch.load(weights, map_location=device or "cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]  # a training checkpoint
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise RuntimeError(f"the serialized weights do not fit {what}: {str(exc).splitlines()[0]} (wrong "
                               "model_kwargs?)") from exc
    return model.eval()


def load_reference(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs, labels or targets) from a reference file: {"inputs": ..., "labels"/"targets": ...}."""
    path = Path(path)
    if not path.exists():
        raise RuntimeError(f"no reference file {path.name} in the .mar: build one from held-out data with "
                           "`selfheal reference` and archive it (selfheal archive --reference)")
    obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        return obj, None
    if not isinstance(obj, dict) or not isinstance(obj.get("inputs"), torch.Tensor):
        raise RuntimeError(f"{path.name} must hold {{'inputs': tensor (R, ...), 'labels' or 'targets': tensor}}")
    targets = obj.get("targets", obj.get("labels"))
    return obj["inputs"], targets
