"""Smoke check of selfheal_core on an accelerator: the whole healer on one device.

Trains the demo CNN, moves it to --device, streams contrast-corrupted digits
with 10% feedback, snapshots, resumes into a fresh healer on the same device
and checks identical predictions, then reset() back to the source predictions.
Prints one JSON line; exits non-zero on a failed check.

    python scripts/cuda_check.py --device cuda
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time

import torch

from selfheal_bench.data import corrupt, load_digits_split, resample
from selfheal_bench.train import split_reference, train
from selfheal_core import HealConfig, FileSnapshotStore, SelfHealer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--samples", type=int, default=2000, help="corrupted digits streamed (the test: fewer)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    model, _ = train(seed=0)
    source = copy.deepcopy(model)
    _, _, x_ref, y_ref = split_reference(0, 300)
    _, _, x_te, y_te = load_digits_split(seed=0)
    x, y = resample(x_te, y_te, args.samples, seed=1)
    x = corrupt(x, "contrast", 5, seed=1).to(dev)
    y = y.to(dev)
    out = {"device": str(dev), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = HealConfig(snapshot_interval_s=0.0)
        healer = SelfHealer(model.to(dev), x_ref.to(dev), cfg, reference_labels=y_ref.to(dev),
                            store=FileSnapshotStore(tmp))
        g = torch.Generator().manual_seed(0)
        correct, t0 = 0, time.perf_counter()
        for i in range(0, len(y), 16):
            pred = healer.predict(x[i:i + 16]).argmax(1)
            correct += int((pred == y[i:i + 16]).sum())
            chosen = (torch.rand(len(pred), generator=g) < 0.1).to(dev)
            if chosen.any():
                healer.feedback(x[i:i + 16][chosen], y[i:i + 16][chosen], served=pred[chosen])
        out["seconds"] = round(time.perf_counter() - t0, 2)
        with torch.no_grad():
            out["static_accuracy"] = float((source.to(dev)(x).argmax(1) == y).float().mean())
        out["served_accuracy"] = correct / len(y)
        status = healer.status()
        out["drift"], out["version"] = status["drift"]["detected"], status["version"]
        probe = x[:64]
        other = SelfHealer(copy.deepcopy(source).to(dev), x_ref.to(dev), cfg, reference_labels=y_ref.to(dev),
                           store=FileSnapshotStore(tmp))
        version = healer.save_snapshot()
        out["resumed"] = other.resume() == version
        out["same_after_resume"] = bool(torch.equal(other.predict(probe), healer.predict(probe)))
        healer.reset()
        with torch.no_grad():
            out["reset_is_source"] = bool(torch.allclose(healer.predict(probe), source(probe), atol=1e-5))
    print(json.dumps(out))
    ok = out["drift"] and out["resumed"] and out["same_after_resume"] and out["reset_is_source"] \
        and out["served_accuracy"] > out["static_accuracy"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
