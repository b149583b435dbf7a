"""The ResNet baseline for scripts/bench_serve.py: the README's image handler without selfheal
(the same decoding and answers, and the same intra-op threads, nothing else)."""
import torch
from ts.torch_handler.vision_handler import VisionHandler

from selfheal_bench.examples.image224_handler import Images224


class PlainImages224(VisionHandler):
    """JPEG bytes in, a class and its confidence out."""

    image_processing = staticmethod(Images224.image_processing)
    postprocess = Images224.postprocess

    def initialize(self, context):
        # the selfheal handler applies `torch_threads` from the model-config's handler section:
        # a baseline on torch's default threads would compare thread counts, not handlers
        threads = ((getattr(context, "model_yaml_config", None) or {}).get("handler") or {}).get("torch_threads")
        if threads:
            torch.set_num_threads(int(threads))
        super().initialize(context)
