"""Digits data (scikit-learn's bundled 8x8 images) and Digits-C style corruptions.

Every corruption maps a float tensor (N, 1, 8, 8) in [0, 1] to the same shape,
is seeded through the generator it is given, and grows with severity 1..5.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

SEVERITIES = (1, 2, 3, 4, 5)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1,797 images of 8x8, values 0-16; no download), as
    `sklearn.datasets.load_digits` reads them, without importing scikit-learn: that import (scipy
    with it) took 2.5 CPU-s in every process that loads the digits, several times what reading
    the file takes."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the digits ship with scikit-learn: pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def load_digits_split(seed: int = 0, test_fraction: float = 0.33):
    """Return (x_train, y_train, x_test, y_test): x float (N, 1, 8, 8) in [0, 1], y long (N,)."""
    images, target = _digits()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def _gaussian_noise(x, s, g):
    return x + torch.randn(x.shape, generator=g) * (0.08, 0.16, 0.24, 0.32, 0.40)[s - 1]


def _salt_pepper(x, s, g):
    p = (0.03, 0.06, 0.10, 0.15, 0.20)[s - 1]
    u = torch.rand(x.shape, generator=g)
    return torch.where(u < p / 2, torch.zeros_like(x), torch.where(u > 1 - p / 2, torch.ones_like(x), x))


def _contrast(x, s, g):
    c = (0.75, 0.6, 0.45, 0.35, 0.25)[s - 1]
    m = x.mean(dim=(2, 3), keepdim=True)
    return (x - m) * c + m


def _brightness(x, s, g):
    return x + (0.15, 0.25, 0.35, 0.45, 0.55)[s - 1]


def _invert(x, s, g):
    a = (0.2, 0.4, 0.6, 0.8, 1.0)[s - 1]  # blend towards the negative image
    return (1 - a) * x + a * (1 - x)


def _blur(x, s, g):
    sigma = (0.5, 0.7, 0.9, 1.1, 1.3)[s - 1]
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :]).view(1, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel)


def _affine(x, theta):
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def _rotate(x, s, g):
    deg = (10, 20, 30, 40, 50)[s - 1]
    sign = torch.where(torch.rand(len(x), generator=g) < 0.5, -1.0, 1.0)
    a = sign * math.radians(deg)
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


def _translate(x, s, g):
    shift = (0.125, 0.25, 0.375, 0.5, 0.625)[s - 1]  # in units of half the image width
    d = (torch.rand(len(x), 2, generator=g) * 2 - 1).sign() * shift
    eye = torch.eye(2).expand(len(x), 2, 2)
    theta = torch.cat([eye, d.unsqueeze(2)], dim=2)
    return _affine(x, theta)


def _pixelate(x, s, g):
    size = (6, 5, 4, 3, 2)[s - 1]
    small = F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(small, size=(8, 8), mode="nearest")


CORRUPTIONS: dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise,
    "salt_pepper": _salt_pepper,
    "contrast": _contrast,
    "brightness": _brightness,
    "invert": _invert,
    "blur": _blur,
    "rotate": _rotate,
    "translate": _translate,
    "pixelate": _pixelate,
}


DEMO_PHASES = [  # the demo's stream (scripts/demo.py, bench_estimate): (name, corruption, severity, samples)
    ("clean", None, 0, 600),
    ("contrast-5", "contrast", 5, 1200),
    ("rotate-4", "rotate", 4, 1500),
]


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply corruption `name` at `severity` (1..5) to images x (N, 1, 8, 8); result clipped to [0, 1]."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid: {sorted(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    g = torch.Generator().manual_seed(seed)
    return CORRUPTIONS[name](x, severity, g).clamp(0.0, 1.0)


def resample(x: torch.Tensor, y: torch.Tensor, n: int, seed: int = 0):
    """Draw n samples with replacement (streams longer than the test split)."""
    idx = torch.randint(0, len(y), (n,), generator=torch.Generator().manual_seed(seed))
    return x[idx], y[idx]


def as_numpy_list(x: torch.Tensor) -> list:
    """Nested lists for JSON payloads."""
    return np.round(x.numpy(), 5).tolist()
