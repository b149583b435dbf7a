"""Train an example user model and write what a user would have: weights, held-out data, sample requests.

    python -m selfheal_bench.examples tabular --out build/examples/tabular

Writes, per example, into --out: `weights.pt` (a state_dict; `model.pt` TorchScript for
`torchscript`), `val.npz` (held-out inputs `x` and labels/targets `y`, for `selfheal reference`),
and sample requests under `samples/` (clean and shifted).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from selfheal_bench.examples import data

EXAMPLES = ("images", "tabular", "rul", "torchscript")


def write(name: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    samples = out / "samples"
    samples.mkdir(exist_ok=True)
    if name == "images":
        model, ref = data.train_images()
        torch.save(model.state_dict(), out / "weights.pt")
        for tag, rotate in (("clean", 0.0), ("rotated", 40.0)):
            blobs, labels = data.images(rotate=rotate, n=4, seed=3)
            for i, (blob, label) in enumerate(zip(blobs, labels)):
                (samples / f"{tag}_{i}_digit{int(label)}.png").write_bytes(blob)
    elif name == "torchscript":
        model, ref = data.train_images()
        torch.jit.script(model).save(str(out / "model.pt"))
        (samples / "clean.json").write_text(json.dumps({"instances": ref.x[:2].tolist()}))
    else:
        model, ref = data.train_tabular() if name == "tabular" else data.train_rul()
        torch.save(model.state_dict(), out / "weights.pt")
        gen = data.tabular if name == "tabular" else data.rul
        for tag, shift in (("clean", False), ("shifted", True)):
            rows = gen(4, seed=3, shift=shift).x
            (samples / f"{tag}.json").write_text(json.dumps({"instances": rows.tolist()}))
    np.savez(out / "val.npz", x=ref.x.numpy(), y=ref.y.numpy())
    return {"example": name, "out": str(out), "reference_size": len(ref.y)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("example", choices=EXAMPLES)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    print(json.dumps(write(args.example, args.out)))


if __name__ == "__main__":
    main()
