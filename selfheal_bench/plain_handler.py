"""The baseline for scripts/bench_serve.py: a plain JSON handler for the same model, no selfheal.

Same request and response shape as the selfheal handler ({"instances": [...]} in,
labels and probabilities out), so the benchmark compares like with like.
"""
import importlib.util
import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from ts.torch_handler.base_handler import BaseHandler


class PlainHandler(BaseHandler):
    def initialize(self, context):
        torch.set_num_threads(1)
        model_dir = Path(context.system_properties["model_dir"])
        spec_model = context.manifest["model"]
        spec = importlib.util.spec_from_file_location("model_def", model_dir / spec_model["modelFile"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cls = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if issubclass(c, nn.Module) and c.__module__ == module.__name__][0]
        self.model = cls()
        self.model.load_state_dict(torch.load(model_dir / spec_model["serializedFile"], weights_only=True))
        self.model.eval()
        self.initialized = True

    def handle(self, data, context):
        sizes, xs = [], []
        for row in data:
            body = row.get("body", row.get("data"))
            body = json.loads(body) if isinstance(body, (bytes, bytearray)) else body
            x = torch.tensor(body["instances"], dtype=torch.float32).reshape(-1, 1, 8, 8)
            sizes.append(len(x))
            xs.append(x)
        with torch.inference_mode():
            probs = F.softmax(self.model(torch.cat(xs)), 1)
        out, start = [], 0
        for n in sizes:
            rows = probs[start:start + n]
            start += n
            out.append({"predictions": [{"label": int(p.argmax()), "probabilities": [round(float(v), 6) for v in p]}
                                        for p in rows]})
        return out
