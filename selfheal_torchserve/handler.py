"""The stock selfheal handler: `--handler selfheal_torchserve.handler` in torch-model-archiver.

TorchServe loads the one class defined here. It is `SelfHealMixin` over the
plain JSON-array handler; for any other input (image bytes, text) mix
`SelfHealMixin` into that handler instead (see the README, "Serve your own model").
"""
from selfheal_torchserve.json_handler import JSONArrayHandler
from selfheal_torchserve.mixin import SelfHealMixin


class SelfHealHandler(SelfHealMixin, JSONArrayHandler):
    """JSON arrays in, predictions out, healed while serving."""
