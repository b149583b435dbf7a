import numpy as np
import torch
from selfheal_torchserve import SelfHealMixin
from ts.torch_handler.vision_handler import VisionHandler


class DigitImages(SelfHealMixin, VisionHandler):
    image_processing = staticmethod(lambda im: torch.from_numpy(np.asarray(im.convert("L").resize((8, 8)), np.float32) / 255)[None])

    def postprocess(self, data):
        return [{"digit": int(p.argmax()), "confidence": round(float(p.max()), 4)} for p in data.softmax(1)]
