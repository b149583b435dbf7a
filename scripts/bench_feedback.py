"""Labelled-feedback benchmark: online error of static, naive fine-tuning, SelfHealer and an oracle.

Predict first, then learn; every sample counts. Requests of 8 inputs; a
share of the samples gets its true label back, right after its request or
`delay` samples later. Streams resample the digits test split:
rotate / translate / invert at severity 5, a concept change (labels of two
classes swapped, inputs clean) and a clean stream. Methods, same streams:
- static: the trained model, untouched;
- naive: every weight fine-tuned online, one Adam step (1e-3) per label batch;
- selfheal: `SelfHealer` with its default config but the concept policy `learn`
  (the default `hold` waits for an operator's approval) and the guard's noise
  allowance (`significance` 1), and the labelled reference;
- oracle: the model fine-tuned offline on the whole drifted training split
  (labelled), then served static on the same stream.
Error is measured on the samples after the first 2,000 (the bar's "after
2,000 samples"); the gap closed is (static - method) / (static - oracle).
Two robustness streams (clean, 20% feedback): 10% of the labels wrong at
random; 30% of the labels deliberately wrong, all claiming one class.

    python scripts/bench_feedback.py          # full run (~10 min)
    python scripts/bench_feedback.py --tiny   # a smoke test
"""
from __future__ import annotations

import copy
import json
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from selfheal_bench.data import corrupt, load_digits_split, resample
from selfheal_bench.harness import bench_parser, smoke
from selfheal_bench.train import fit, split_reference, train
from selfheal_core import GuardConfig, HealConfig, LearnConfig, SelfHealer

log = logging.getLogger("bench_feedback")
BATCH = 8
SWAP = (1, 7)  # the concept change: these two classes trade labels
TARGET = 7  # the class the adversarial labeller pushes


def swap(y: torch.Tensor) -> torch.Tensor:
    out = y.clone()
    out[y == SWAP[0]], out[y == SWAP[1]] = SWAP[1], SWAP[0]
    return out


def make_stream(kind: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, x_te, y_te = load_digits_split(seed=0)
    x, y = resample(x_te, y_te, n, seed=seed)
    if kind in ("rotate", "translate", "invert"):
        return corrupt(x, kind, 5, seed=seed), y
    if kind == "concept":
        return x, swap(y)
    return x, y


def drifted_training_split(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    x_tr, y_tr, _, _ = split_reference(0, 300)
    if kind in ("rotate", "translate", "invert"):
        return corrupt(x_tr, kind, 5, seed=123), y_tr
    return x_tr, swap(y_tr) if kind == "concept" else y_tr


def oracle(model: nn.Module, kind: str, epochs: int) -> nn.Module:
    """Periodic full retraining, the upper bound: fine-tune every weight on the labelled drifted split."""
    x, y = drifted_training_split(kind)
    # in eval mode, as it always was: BatchNorm keeps the source statistics while the weights move
    return fit(copy.deepcopy(model), x, y, epochs, lr=1e-3, batch=32, seed=0, train_mode=False)


class Static:
    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.model(x), 1)

    def feedback(self, x, y, served, confidence) -> None:
        pass


class Naive(Static):
    """Online fine-tuning of every weight, one step per arriving label batch, no safeguards."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def feedback(self, x, y, served, confidence) -> None:
        self.opt.zero_grad()
        F.cross_entropy(self.model(x), y).backward()
        self.opt.step()


class Heal:
    def __init__(self, model: nn.Module, x_ref: torch.Tensor, y_ref: torch.Tensor, tiny: bool) -> None:
        # concept policy `learn`: a concept change contradicts the trusted reference by definition, and the
        # peers learn every label; the shipped default `hold` waits for an operator (bench_attack measures it).
        # significance 1: the guard lets one paired standard error of holdout noise through; min_steps 5:
        # fewer steps per label when labels are plentiful
        guard = GuardConfig(concept_change="learn", significance=1.0)
        config = HealConfig(guard=guard, learn=LearnConfig(min_steps=5))
        self.healer = SelfHealer(model, x_ref, smoke(config) if tiny else config, reference_labels=y_ref)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.healer.predict(x), 1)

    def feedback(self, x, y, served, confidence) -> None:
        self.healer.feedback(x, y, served=served, confidence=confidence)


def run(method, x: torch.Tensor, y: torch.Tensor, rate: float, delay: int, seed: int,
        corrupt_labels: str | None = None) -> tuple[torch.Tensor, int]:
    """Per-sample correctness (predict, then learn) and the number of labels given back."""
    g = torch.Generator().manual_seed(seed)
    pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    correct, given = [], 0
    for i in range(0, len(y), BATCH):
        xb, yb = x[i:i + BATCH], y[i:i + BATCH]
        probs = method.predict(xb)
        conf, served = probs.max(1)
        correct.append(served == yb)
        chosen = torch.rand(len(yb), generator=g) < rate
        if chosen.any():
            labels = yb[chosen].clone()
            if corrupt_labels == "noise":  # 10% wrong at random
                flip = torch.rand(len(labels), generator=g) < 0.10
                labels[flip] = (labels[flip] + torch.randint(1, 10, (int(flip.sum()),), generator=g)) % 10
            elif corrupt_labels == "attack":  # 30% of the labels claim TARGET
                flip = (torch.rand(len(labels), generator=g) < 0.30 / 0.9) & (labels != TARGET)
                labels[flip] = TARGET
            pending.append((i + BATCH + delay, xb[chosen], labels, served[chosen], conf[chosen]))
        while pending and pending[0][0] <= i + BATCH:
            _, fx, fy, fs, fc = pending.pop(0)
            method.feedback(fx, fy, fs, fc)
            given += len(fy)
    return torch.cat(correct).float(), given


def main() -> None:
    args = bench_parser(__doc__, "feedback.json").parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    n, skip = (240, 80) if args.tiny else (6_000, 2_000)
    kinds = ["rotate", "concept"] if args.tiny else ["rotate", "translate", "invert", "concept", "clean"]
    rates = [0.2] if args.tiny else [0.01, 0.05, 0.20]
    delays = [0] if args.tiny else [0, 500]
    model, _ = train(seed=0)
    _, _, x_ref, y_ref = split_reference(0, 300)

    def make(meth: str):
        m = copy.deepcopy(model)
        return Static(m) if meth == "static" else Naive(m) if meth == "naive" else Heal(m, x_ref, y_ref, args.tiny)

    rows = []
    for k, kind in enumerate(kinds):
        x, y = make_stream(kind, n, seed=100 + k)
        base = {"static": Static(copy.deepcopy(model)), "oracle": Static(oracle(model, kind, 1 if args.tiny else 15))}
        ref_err = {}
        for meth, method in base.items():
            correct, _ = run(method, x, y, 0.0, 0, seed=k)
            ref_err[meth] = 1 - correct[skip:].mean().item()
            rows.append({"stream": kind, "method": meth, "rate": None, "delay": None, "error": ref_err[meth]})
        for rate in rates:
            for delay in delays:
                for meth in ("naive", "selfheal"):
                    method = make(meth)
                    start = time.perf_counter()
                    correct, given = run(method, x, y, rate, delay, seed=k)
                    err = 1 - correct[skip:].mean().item()
                    gap = ref_err["static"] - ref_err["oracle"]
                    row = {"stream": kind, "method": meth, "rate": rate, "delay": delay, "error": err,
                           "labels": given, "seconds": time.perf_counter() - start,
                           "gap_closed": (ref_err["static"] - err) / gap if gap > 0.01 else None}
                    if meth == "selfheal":
                        st = method.healer.status()
                        row["updates"], row["rolled_back"] = st["counters"]["updates"], st["guard"]["rolled_back"]
                    rows.append(row)
                    log.info("%-9s rate %.2f delay %3d %-8s error %.4f (static %.4f oracle %.4f) %.1fs",
                             kind, rate, delay, meth, err, ref_err["static"], ref_err["oracle"], row["seconds"])
    robust = []
    x, y = make_stream("clean", n, seed=200)
    static_err = 1 - run(Static(copy.deepcopy(model)), x, y, 0.0, 0, 0)[0][skip:].mean().item()
    for labels in ("noise", "attack"):
        for meth in ("naive", "selfheal"):
            method = make(meth)
            correct, given = run(method, x, y, 0.2, 0, seed=7, corrupt_labels=labels)
            row = {"stream": f"clean, labels {labels}", "method": meth, "rate": 0.2, "error": 1 - correct[skip:].mean().item(),
                   "static": static_err, "labels": given}
            if meth == "selfheal":
                row["quarantine"] = method.healer.status()["quarantine"]
            robust.append(row)
            log.info("%s %s error %.4f static %.4f", row["stream"], meth, row["error"], static_err)
    report(rows, robust, args, time.time() - t0, skip)


def report(rows: list[dict], robust: list[dict], args, elapsed: float, skip: int) -> None:
    print(f"\nonline error after the first {skip} samples (requests of {BATCH}); gap closed in brackets")
    print(f"{'stream':<10} {'static':>7} {'oracle':>7} {'rate':>5} {'delay':>5} {'naive':>16} {'selfheal':>16}")
    ref = {(r["stream"], r["method"]): r["error"] for r in rows if r["rate"] is None}
    cell = {(r["stream"], r["rate"], r["delay"], r["method"]): r for r in rows if r["rate"] is not None}

    def fmt(r):
        gap = "" if r["gap_closed"] is None else f" ({r['gap_closed']:+.2f})"
        return f"{r['error']:.4f}{gap}"

    for stream, rate, delay in sorted({k[:3] for k in cell}, key=lambda k: (k[0], k[1], k[2])):
        print(f"{stream:<10} {ref[(stream, 'static')]:7.4f} {ref[(stream, 'oracle')]:7.4f} {rate:5.2f} {delay:5d} "
              f"{fmt(cell[(stream, rate, delay, 'naive')]):>16} {fmt(cell[(stream, rate, delay, 'selfheal')]):>16}")
    print("\nrobustness (clean stream, 20% feedback):")
    for r in robust:
        q = r.get("quarantine")
        print(f"  {r['stream']:<22} {r['method']:<9} error {r['error']:.4f}  static {r['static']:.4f}  "
              f"(+{100 * (r['error'] - r['static']):.2f} points)" + (f"  quarantined {q['quarantined']}" if q else ""))
    bars = {}
    drifted = [r for r in rows if r["method"] == "selfheal" and r["gap_closed"] is not None]
    for rate, target in ((0.05, 0.85), (0.01, 0.5)):
        chosen = [r for r in drifted if r["rate"] == rate]
        if chosen:  # the keys first: the mean over drifted streams and delays
            bars[f"gap_closed_{rate:.0%}".replace("%", "pct")] = round(sum(r["gap_closed"] for r in chosen) / len(chosen), 3)
            bars[f"gap closed at {rate:.0%} feedback, mean over drifted streams and delays (>= {target})"] = round(
                sum(r["gap_closed"] for r in chosen) / len(chosen), 3)
            bars[f"gap closed at {rate:.0%} feedback, worst stream/delay (>= {target})"] = round(
                min(r["gap_closed"] for r in chosen), 3)
    for r in robust:
        if r["method"] == "selfheal":
            target = 0.5 if "noise" in r["stream"] else 1.0
            bars[f"{r['stream']}: error - static, points (<= {target})"] = round(100 * (r["error"] - r["static"]), 2)
            if "attack" in r["stream"]:
                bars["attack quarantined labels (> 0)"] = r["quarantine"]["quarantined"]
    print("\nbars:")
    for k, v in bars.items():
        print(f"  {k}: {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tiny": args.tiny, "elapsed_s": elapsed, "skip": skip, "rows": rows,
                                    "robust": robust, "bars": bars}, indent=2))
    print(f"\nwrote {args.out} ({elapsed:.0f}s)")


if __name__ == "__main__":
    main()
