"""The 224x224 workload of the production-scale benchmarks (bench_scale.py, bench_serve.py): a
ResNet-18 with seeded random weights (cost, not accuracy), JPEG requests, and its reference
written with `selfheal reference` as a user writes it."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

EXAMPLES = Path(__file__).resolve().parent / "examples"
MODEL_FILE = EXAMPLES / "resnet18.py"
HANDLER = EXAMPLES / "image224_handler.py"
WEIGHTS = "weights.pt"


def jpegs(n: int, seed: int, shifted: bool) -> list[bytes]:
    """n distinct 224x224 JPEG images (smooth random colour fields); `shifted`: brighter, lower contrast."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        im = Image.fromarray(small).resize((224, 224), Image.BICUBIC)
        if shifted:
            im = ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(1.5)).enhance(0.5)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decode(blob: bytes) -> torch.Tensor:
    """What the handler does with a request's bytes: (3, 224, 224) in [0, 1]."""
    from PIL import Image

    im = Image.open(io.BytesIO(blob)).convert("RGB").resize((224, 224))
    return torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)


@torch.no_grad()
def answers(model: torch.nn.Module, blobs: list[bytes]) -> list[int]:
    """The model's classes for JPEG requests (the stand-in ground truth of the clean images)."""
    x = torch.stack([decode(b) for b in blobs])
    return torch.cat([model(x[i:i + 16]).argmax(1) for i in range(0, len(x), 16)]).tolist()


def prepare(model_dir: Path) -> torch.nn.Module:
    """Seeded ResNet-18 weights (`weights.pt`) and a labelled reference of 128 clean images
    (`reference.pt`, by `selfheal reference`) in `model_dir`; returns the model."""
    from selfheal_bench.examples.resnet18 import ResNet18

    torch.manual_seed(0)
    model = ResNet18().eval()
    torch.save(model.state_dict(), model_dir / WEIGHTS)
    ref_images = jpegs(128, seed=1, shifted=False)
    np.savez(model_dir / "val.npz", x=torch.stack([decode(b) for b in ref_images]).numpy(),
             y=np.asarray(answers(model, ref_images)))
    cmd = [str(Path(sys.executable).with_name("selfheal")), "reference", "--inputs", str(model_dir / "val.npz"),
           "--inputs-key", "x", "--labels", str(model_dir / "val.npz"), "--labels-key", "y",
           "--out", str(model_dir / "reference.pt"), "--model-file", str(MODEL_FILE),
           "--weights", str(model_dir / WEIGHTS)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"selfheal reference: {done.stderr[-2000:]}")
    return model
