"""Data and training for the example user models (images, tabular, regression, TorchScript).

Everything is generated or comes with scikit-learn: nothing is downloaded. Each
example has a clean stream and a shifted one, the kind of change a deployment
meets: images rotated, tabular sensors recalibrated, degradation sensors that
drift in gain.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from selfheal_bench.data import load_digits_split
from selfheal_bench import train
from selfheal_bench.models import DigitsCNN


@dataclass
class Split:
    x: torch.Tensor  # model inputs (preprocessed)
    y: torch.Tensor  # labels (long) or targets (float, (N, 1))


def fit(name: str, make, x: torch.Tensor, y: torch.Tensor, loss, epochs: int, lr: float = 3e-3,
        seed: int = 0) -> nn.Module:
    """A model from `make()` (after seeding: the same weights in any process), trained by the shared
    loop and cached (`selfheal_bench.train.cached_fit`: the images and TorchScript examples train
    the same network, and the README's steps train the tabular one the tests train too)."""
    return train.cached_fit(f"example-{name}", make, x, y, epochs, lr=lr, loss=loss, seed=seed)


# ---------------------------------------------------------------------------- images
def image_bytes(img8: torch.Tensor, fmt: str = "PNG", rotate: float = 0.0) -> bytes:
    """An 8x8 digit (values in [0, 1]) as a 32x32 grayscale image file, optionally rotated."""
    arr = (img8.reshape(8, 8).numpy() * 255).round().astype(np.uint8)
    im = Image.fromarray(arr, mode="L").resize((32, 32), Image.BILINEAR)
    if rotate:
        im = im.rotate(rotate, resample=Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def decode_image(blob: bytes) -> torch.Tensor:
    """What the example image handler does with a request's bytes: (1, 8, 8) in [0, 1]."""
    im = Image.open(io.BytesIO(blob))
    return torch.from_numpy(np.asarray(im.convert("L").resize((8, 8)), np.float32) / 255)[None]


def images(rotate: float = 0.0, split: str = "test", fmt: str = "PNG", n: int | None = None,
           seed: int = 0) -> tuple[list[bytes], torch.Tensor]:
    """(image files, labels) of a digits split; `rotate` degrees, alternating sign per image."""
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    if n is not None:
        idx = torch.randint(0, len(y), (n,), generator=torch.Generator().manual_seed(seed))
        x, y = x[idx], y[idx]
    signs = [1 if i % 2 else -1 for i in range(len(y))]
    return [image_bytes(xi, fmt, rotate * s) for xi, s in zip(x, signs)], y


def train_images() -> tuple[nn.Module, Split]:
    """DigitsCNN trained on decoded training images; returns it and a held-out reference split."""
    blobs, y = images(split="train")
    x = torch.stack([decode_image(b) for b in blobs])
    held = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    ref, fit_idx = held[:300], held[300:]
    model = fit("images", DigitsCNN, x[fit_idx], y[fit_idx], F.cross_entropy, epochs=20)
    return model, Split(x[ref], y[ref])


# ---------------------------------------------------------------------------- tabular
TABULAR = {"n_features": 10, "hidden": 32, "n_classes": 3}


TABULAR_PARTS = {"train": (0, 8_000), "reference": (8_000, 10_000), "stream": (10_000, 30_000)}


def tabular(n: int, seed: int, shift: bool = False, part: str = "stream") -> Split:
    """Three classes of ten sensor-like features (a fixed concept), rows drawn from one `part` of the
    data (training, held-out reference and live streams never share a row); `shift`: four sensors
    recalibrated."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=30_000, n_features=10, n_informative=6, n_redundant=2, n_classes=3,
                               class_sep=1.2, random_state=7)
    lo, hi = TABULAR_PARTS[part]
    idx = lo + np.random.default_rng(seed).choice(hi - lo, n, replace=n > hi - lo)
    x, y = x[idx].astype(np.float32), y[idx]
    if shift:
        x[:, :4] = x[:, :4] * 1.4 + 1.2
    return Split(torch.from_numpy(x), torch.from_numpy(y).long())


def train_tabular() -> tuple[nn.Module, Split]:
    from selfheal_bench.examples.tabular_model import TabularMLP

    data = tabular(8_000, seed=1, part="train")
    model = fit("tabular", lambda: TabularMLP(**TABULAR), data.x, data.y, F.cross_entropy, epochs=30)
    return model, tabular(400, seed=2, part="reference")


# ---------------------------------------------------------------------------- regression
RUL = {"n_sensors": 8, "hidden": 64}


def rul(n: int, seed: int, shift: bool = False) -> Split:
    """Remaining useful life (cycles) from 8 noisy sensors that track wear; `shift`: three sensors'
    gain drifts (ageing instruments)."""
    rng = np.random.default_rng(seed)
    wear = rng.uniform(0, 1, n)
    gains = np.linspace(0.5, 2.0, 8)
    sensors = wear[:, None] * gains + 0.3 * np.sin(3 * wear[:, None] * gains) + rng.normal(0, 0.05, (n, 8))
    if shift:
        sensors[:, :3] = sensors[:, :3] * 1.35 + 0.15
    cycles = 200.0 * (1.0 - wear) + rng.normal(0, 3.0, n)
    return Split(torch.from_numpy(sensors.astype(np.float32)), torch.from_numpy(cycles.astype(np.float32))[:, None])


def train_rul() -> tuple[nn.Module, Split]:
    from selfheal_bench.examples.rul_model import RULRegressor

    data = rul(4_000, seed=1)
    model = fit("rul", lambda: RULRegressor(**RUL), data.x, data.y, F.mse_loss, epochs=60)
    return model, rul(400, seed=2)
