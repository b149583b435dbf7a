"""The one training loop every benchmark, example and the demo use, and the demo CNN's training.

`fit` is Adam on shuffled minibatches; the digits CNN is trained on the train split less a
held-out reference sample (`split_reference`), which is what `selfheal reference` wants:
drawn from the training distribution but never fitted on.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from selfheal_bench.data import load_digits_split
from selfheal_bench.models import DigitsCNN

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
log = logging.getLogger(__name__)
# Trained demo CNNs, keyed by the training code and arguments: a dozen benchmarks and tests train
# the same one (SELFHEAL_BENCH_CACHE moves it; an unwritable one just means training every time).
CACHE = Path(os.environ.get("SELFHEAL_BENCH_CACHE", Path(__file__).resolve().parent.parent / "build" / "cache"))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 3e-3, batch: int = 64,
        loss: Loss = F.cross_entropy, seed: int | None = 0, train_mode: bool = True) -> nn.Module:
    """Train `model` with Adam for `epochs` passes over (x, y) in shuffled minibatches; returns it in
    eval mode. `seed`: the shuffling's own generator (None: the global one); `train_mode` False
    fine-tunes in eval mode (BatchNorm keeps the statistics it has)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for _ in range(epochs):
        if train_mode:
            model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            loss(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def split_reference(seed: int = 0, size: int = 300):
    """Train split minus a held-out reference sample: (x_fit, y_fit, x_ref, y_ref).

    The reference is drawn from the training distribution but not fitted on, so
    detector calibration sees the confidence of unseen in-distribution inputs
    (a fitted sample would look over-confident and make clean traffic alarm).
    """
    x_tr, y_tr, _, _ = load_digits_split(seed=seed)
    perm = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(seed + 1))
    ref, keep = perm[:size], perm[size:]
    return x_tr[keep], y_tr[keep], x_tr[ref].clone(), y_tr[ref].clone()


def train(seed: int = 0, epochs: int = 20, reference_size: int = 300) -> tuple[DigitsCNN, dict]:
    """The demo CNN trained on the train split less the reference; the model and its test accuracy.
    Cached under `CACHE` with the global RNG state training left, so a cached call leaves the
    process exactly as training would."""
    here = Path(__file__).resolve().parent
    key = hashlib.sha256(b"".join((here / f).read_bytes() for f in ("train.py", "models.py", "data.py"))
                         + json.dumps([seed, epochs, reference_size, torch.__version__]).encode()).hexdigest()[:20]
    path = CACHE / f"digits_cnn-{key}.pt"
    model = DigitsCNN()
    info = _load_cached(path, model)
    if info is not None:
        return model.eval(), info
    torch.manual_seed(seed)
    x_tr, y_tr, _, _ = split_reference(seed, reference_size)
    _, _, x_te, y_te = load_digits_split(seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights whichever process trains first (sums split over threads differ)
    try:
        model = fit(DigitsCNN(), x_tr, y_tr, epochs, seed=seed)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    info = {"test_accuracy": acc, "train_size": len(y_tr), "test_size": len(y_te)}
    _store_cached(path, model, info)
    return model, info


def cached_fit(name: str, make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, epochs: int,
               lr: float = 3e-3, loss: Loss = F.cross_entropy, seed: int = 0) -> nn.Module:
    """`fit(make(), x, y, ...)` after `torch.manual_seed(seed)`, cached under `CACHE` like the demo
    CNN, keyed by all the weights depend on: the initial weights, the data, the settings, the code
    of the model's module and of this one, torch's version and its threads."""
    torch.manual_seed(seed)
    model = make()
    h = hashlib.sha256(json.dumps([name, epochs, lr, seed, getattr(loss, "__name__", repr(loss)), torch.__version__,
                                   torch.get_num_threads()]).encode())
    for t in (*model.state_dict().values(), x, y):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for code in (Path(__file__), Path(inspect.getfile(type(model)))):
        h.update(code.read_bytes())
    path = CACHE / f"{name}-{h.hexdigest()[:20]}.pt"
    if _load_cached(path, model) is not None:
        return model.eval()
    torch.manual_seed(seed)  # a damaged entry may have loaded part of the weights: start afresh
    model = fit(make(), x, y, epochs, lr=lr, loss=loss, seed=seed)
    _store_cached(path, model, {})
    return model


def _load_cached(path: Path, model: nn.Module) -> dict | None:
    """Weights into `model` and the global RNG state as training left it, from a cache entry; its
    info, or None when there is none or it is damaged (then the caller trains and replaces it)."""
    try:
        cached = torch.load(path, weights_only=True)
        model.load_state_dict(cached["weights"])
        torch.set_rng_state(cached["rng"])
        return cached["info"]
    except FileNotFoundError:
        return None
    except Exception as exc:
        log.warning("ignoring the cached model %s: %s", path, exc)
        return None


def _store_cached(path: Path, model: nn.Module, info: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"weights": model.state_dict(), "rng": torch.get_rng_state(), "info": info}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old entry or the whole new one
    except OSError as exc:
        log.info("not caching the trained model (%s)", exc)


def save_demo(out, seed: int = 0, reference_size: int = 300) -> tuple[DigitsCNN, dict]:
    """Train the demo CNN and write what `selfheal archive` takes: <out>/digits_cnn.pt (state_dict)
    and <out>/reference.pt ({"inputs", "labels"}, the held-out reference sample)."""
    from pathlib import Path

    out = Path(out)
    model, info = train(seed=seed, reference_size=reference_size)
    _, _, x_ref, y_ref = split_reference(seed, reference_size)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "digits_cnn.pt")
    torch.save({"inputs": x_ref, "labels": y_ref}, out / "reference.pt")
    return model, info
