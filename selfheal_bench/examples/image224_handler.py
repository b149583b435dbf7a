import numpy as np
import torch
from selfheal_torchserve import SelfHealMixin
from ts.torch_handler.vision_handler import VisionHandler


class Images224(SelfHealMixin, VisionHandler):
    image_processing = staticmethod(lambda im: torch.from_numpy(np.asarray(im.convert("RGB").resize((224, 224)), np.float32) / 255).permute(2, 0, 1))

    def postprocess(self, data):
        return [{"label": int(p.argmax()), "confidence": round(float(p.max()), 4)} for p in data.softmax(1)]
