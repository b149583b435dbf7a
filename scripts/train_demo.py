"""Train the demo CNN on scikit-learn's digits and save weights plus a reference sample.

Writes <out>/digits_cnn.pt (state_dict) and <out>/reference.pt
({"inputs": (R, 1, 8, 8), "labels": (R,)}), both read by the handler from the .mar.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from selfheal_bench.train import save_demo

log = logging.getLogger("train_demo")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("build/model"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference-size", type=int, default=300)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    _, info = save_demo(args.out, args.seed, args.reference_size)
    log.info("trained DigitsCNN in %.1fs: test accuracy %.3f; wrote %s", time.time() - t0, info["test_accuracy"], args.out)


if __name__ == "__main__":
    main()
