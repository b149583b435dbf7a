"""selfheal for TorchServe: `SelfHealMixin` for any handler, the stock JSON handler, the learner process.

    class MyHandler(SelfHealMixin, ImageClassifier): ...     # your handler, healed
    torch-model-archiver ... --handler selfheal_torchserve.handler   # or the stock JSON-array handler

Names are imported on first use, so the `selfheal` command does not import TorchServe.
"""
import importlib

_WHERE = {"SelfHealMixin": "selfheal_torchserve.mixin", "RequestError": "selfheal_torchserve.errors",
          "JSONArrayHandler": "selfheal_torchserve.json_handler", "HandlerSettings": "selfheal_serving.settings",
          "JsonLimits": "selfheal_serving.settings"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'selfheal_torchserve' has no attribute {name!r}")
