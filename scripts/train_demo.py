"""Train the demo CNN on scikit-learn's digits and save weights plus a reference sample.

Writes <out>/digits_cnn.pt (state_dict) and <out>/reference.pt
({"inputs": (R, 1, 8, 8), "labels": (R,)}), both read by the handler from the .mar.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from torch import nn

from selfheal_bench.data import load_digits_split
from selfheal_bench.models import DigitsCNN

log = logging.getLogger("train_demo")


def split_reference(seed: int = 0, size: int = 300):
    """Train split minus a held-out reference sample: (x_fit, y_fit, x_ref, y_ref).

    The reference is drawn from the training distribution but not fitted on, so
    detector calibration sees the confidence of unseen in-distribution inputs
    (a fitted sample would look over-confident and make clean traffic alarm).
    """
    x_tr, y_tr, _, _ = load_digits_split(seed=seed)
    perm = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(seed + 1))
    ref, fit = perm[:size], perm[size:]
    return x_tr[fit], y_tr[fit], x_tr[ref].clone(), y_tr[ref].clone()


def train(seed: int = 0, epochs: int = 20, reference_size: int = 300) -> tuple[DigitsCNN, dict]:
    """Train with Adam on the train split less the reference; return the model and its test accuracy."""
    torch.manual_seed(seed)
    x_tr, y_tr, _, _ = split_reference(seed, reference_size)
    _, _, x_te, y_te = load_digits_split(seed=seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss_fn(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    return model, {"test_accuracy": acc, "train_size": len(y_tr), "test_size": len(y_te)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("build/model"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-size", type=int, default=300)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    model, info = train(seed=args.seed, reference_size=args.reference_size)
    _, _, x_ref, y_ref = split_reference(args.seed, args.reference_size)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "digits_cnn.pt")
    torch.save({"inputs": x_ref, "labels": y_ref}, args.out / "reference.pt")
    log.info("trained DigitsCNN in %.1fs: test accuracy %.3f; wrote %s", time.time() - t0, info["test_accuracy"], args.out)


if __name__ == "__main__":
    main()
