"""Tabular concept drift: SelfHealer against river's online learners on river's synthetic streams.

Streams (river.datasets.synth, seeded; 5,000 samples of the first concept to
pretrain on, then 20,000 served in requests of 16, prequential: every request
is predicted first, then its labelled share is learned):
- sea: SEA concepts 0 -> 1 -> 2 -> 3, abrupt switches every 5,000 samples
  (the first at 5,000);
- hyperplane: a rotating hyperplane (10 features, 5 drifting, magnitude
  0.001 per sample), gradual from the first served sample;
- friedman: FriedmanDrift, global recurring abrupt (at 5,000, back at
  15,000), regression.

Methods, all pretrained on the same 5,000 samples and given the same labels
(5% chosen at random, or every label):
- static: a small MLP (2 hidden layers of 64, inputs standardised inside the
  model), never updated; `mlp` without BatchNorm, `mlp_bn` with;
- selfheal: `SelfHealer` around that MLP, default config except the concept
  policy `learn` (river learns every label, and concept drift contradicts the
  reference by definition) and the guard's noise allowance (`significance` 1:
  an update may raise the held-back loss by one paired standard error) and
  `min_steps` 5 (fewer steps per label when labels are plentiful), its
  labelled reference the last 500 pretraining samples (not fitted);
- selfheal label-free: the same without labels;
- arf / hat: river's Adaptive Random Forest and Hoeffding Adaptive Tree
  (ARF regressor and HAT regressor for friedman), default settings.
Accuracy (MSE for friedman) is measured on the samples after the first drift;
time per 1,000 samples counts predicting and learning.

    python scripts/bench_tabular.py           # full run (~10 min)
    python scripts/bench_tabular.py --tiny    # a smoke test
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import time

import numpy as np
import torch

from selfheal_bench.harness import bench_parser, smoke
from selfheal_bench.tabular import REQUEST, Heal, River, Static, make_mlp, prequential, pretrain, river_models, score
from selfheal_core import GuardConfig, HealConfig, LearnConfig

log = logging.getLogger("bench_tabular")
RATES = (0.05, 1.0)
# concept policy learn (river learns every label, and concept drift contradicts the reference by
# definition), the guard's noise allowance and fewer steps per label when labels are plentiful
TUNED = HealConfig(guard=GuardConfig(concept_change="learn", significance=1.0), learn=LearnConfig(min_steps=5))


# ----------------------------------------------------------------------------- streams
def make_stream(name: str, pre: int, n: int, seed: int = 1) -> dict:
    """{"x": (pre + n, d) float32, "y": (pre + n,), "drift_at": index in the served part, "task": ...}"""
    from river.datasets import synth

    if name == "sea":
        parts, per = [], n // 4
        for variant, count in ((0, pre + per), (1, per), (2, per), (3, n - 3 * per)):
            parts += list(itertools.islice(synth.SEA(variant=variant, seed=seed + variant), count))
        rows, drift_at, task = parts, per, "classification"
    elif name == "hyperplane":
        gen = synth.Hyperplane(seed=seed, n_features=10, n_drift_features=5, mag_change=0.001,
                               noise_percentage=0.05, sigma=0.1)
        rows, drift_at, task = list(itertools.islice(gen, pre + n)), 0, "classification"
    elif name == "friedman":
        gen = synth.FriedmanDrift(drift_type="gra", position=(pre + n // 4, pre + 3 * n // 4), seed=seed)
        rows, drift_at, task = list(itertools.islice(gen, pre + n)), n // 4, "regression"
    else:
        raise ValueError(f"unknown stream {name!r}")
    keys = list(rows[0][0])
    x = np.array([[r[0][k] for k in keys] for r in rows], dtype=np.float32)
    y = np.array([float(r[1]) for r in rows], dtype=np.float32)
    return {"x": x, "y": y, "drift_at": drift_at, "task": task, "keys": keys}


# ----------------------------------------------------------------------------- main
def run_stream(name: str, pre: int, n: int, epochs: int, config: HealConfig) -> dict:
    s = make_stream(name, pre, n)
    task, x, y, cut = s["task"], s["x"], s["y"], s["drift_at"]
    fit, ref = slice(0, pre - 500), slice(pre - 500, pre)
    xs, ys = x[pre:], y[pre:]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    out = 2 if task == "classification" else 1
    result: dict = {"task": task, "samples": n, "drift_at": cut, "methods": {}}
    better = max if task == "classification" else min

    def record(label: str, preds: np.ndarray, seconds: float, extra: dict | None = None) -> None:
        row = {"after_drift": round(score(task, preds[cut:], ys[cut:]), 4), "all": round(score(task, preds, ys), 4),
               "s_per_1k": round(1000 * seconds / n, 3), **(extra or {})}
        result["methods"][label] = row
        log.info("%-10s %-24s after drift %.4f  all %.4f  %.3f s/1k", name, label, row["after_drift"], row["all"],
                 row["s_per_1k"])

    for kind in ("mlp", "mlp_bn"):
        torch.manual_seed(0)
        base = pretrain(make_mlp(x.shape[1], out, kind == "mlp_bn", xt[fit]), xt[fit], yt[fit], task, epochs, 0)
        preds, secs = prequential(Static(copy.deepcopy(base), task), xs, ys, 0.0, 0)
        record(f"{kind}_static", preds, secs)
        for rate in (0.0,) + RATES:
            method = Heal(copy.deepcopy(base), task, xt[ref], yt[ref], config)
            preds, secs = prequential(method, xs, ys, rate, 0)
            st = method.healer.status()
            counters = method.healer.learner.counters
            updates = st["guard"]["accepted"] + st["guard"]["rolled_back"]
            record(f"{kind}_selfheal_{int(rate * 100)}pct", preds, secs, {
                "updates": updates, "rolled_back_share": round(st["guard"]["rolled_back"] / updates, 3) if updates else None,
                "held_honest_labels": counters["quarantined"], "labels": counters["feedback"],
                "reference_rejected": counters.get("reference_rejected", 0),
                "label_free": (st["label_free"] or {}).get("available")})
    for peer, model in river_models(task, 1).items():
        learner = River(model, s["keys"], task)
        for i in range(0, pre - 500, 64):  # pretrain on the same samples the MLP fitted
            learner.learn(x[i:min(i + 64, pre - 500)], y[i:min(i + 64, pre - 500)], None)
        for rate in RATES:
            preds, secs = prequential(River(copy.deepcopy(model), s["keys"], task), xs, ys, rate, 0)
            record(f"{peer}_{int(rate * 100)}pct", preds, secs)

    m = result["methods"]
    for rate in RATES:
        pct = f"{int(rate * 100)}pct"
        ours = better(m[f"mlp_selfheal_{pct}"]["after_drift"], m[f"mlp_bn_selfheal_{pct}"]["after_drift"])
        result[f"selfheal_{pct}_after_drift"] = ours
        result[f"best_river_{pct}_after_drift"] = better(m[f"arf_{pct}"]["after_drift"], m[f"hat_{pct}"]["after_drift"])
        result[f"arf_{pct}_after_drift"] = m[f"arf_{pct}"]["after_drift"]
    result["selfheal_s_per_1k"] = max(m["mlp_selfheal_100pct"]["s_per_1k"], m["mlp_bn_selfheal_100pct"]["s_per_1k"])
    result["arf_s_per_1k"] = m["arf_100pct"]["s_per_1k"]
    result["rolled_back_share"] = {f"{k}_{pct}": m[f"{k}_selfheal_{pct}"]["rolled_back_share"]
                                   for k in ("mlp", "mlp_bn") for pct in ("5pct", "100pct")}
    result["held_honest_labels"] = {f"{k}_{pct}": m[f"{k}_selfheal_{pct}"]["held_honest_labels"]
                                    for k in ("mlp", "mlp_bn") for pct in ("5pct", "100pct")}
    sign = 1 if task == "classification" else -1  # positive: label-free is better than static
    result["labelfree_minus_static"] = round(min(
        sign * (m[f"{k}_selfheal_0pct"]["after_drift"] - m[f"{k}_static"]["after_drift"]) for k in ("mlp", "mlp_bn")), 4)
    return result


def main() -> None:
    ap = bench_parser(__doc__, "tabular.json")
    ap.add_argument("--streams", default="sea,hyperplane,friedman")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pre, n, epochs = (600, 300, 3) if args.tiny else (5_000, 20_000, 30)
    t0 = time.time()
    config = smoke(TUNED) if args.tiny else TUNED
    streams = {name: run_stream(name, pre, n, epochs, config) for name in args.streams.split(",")}
    bars, targets = {}, {}
    for name, r in streams.items():
        if r["task"] == "classification":
            for pct in ("5pct", "100pct"):
                bars[f"{name}_{pct}_vs_best_river"] = round(r[f"selfheal_{pct}_after_drift"] - r[f"best_river_{pct}_after_drift"], 4)
                targets[f"{name}_{pct}_vs_best_river"] = ">= 0"
        else:  # MSE: lower is better
            bars[f"{name}_5pct_mse_vs_arf"] = round(r["selfheal_5pct_after_drift"] / r["arf_5pct_after_drift"], 3)
            targets[f"{name}_5pct_mse_vs_arf"] = "<= 1"
        bars[f"{name}_time_vs_arf"] = round(r["selfheal_s_per_1k"] / r["arf_s_per_1k"], 3)
        targets[f"{name}_time_vs_arf"] = "<= 1"
        bars[f"{name}_labelfree_minus_static"] = r["labelfree_minus_static"]
        targets[f"{name}_labelfree_minus_static"] = ">= 0"
    print(f"\n{'stream':<11} {'method':<24} {'after drift':>11} {'all':>8} {'s/1k':>7} {'rolled back':>11}")
    for name, r in streams.items():
        for label, row in r["methods"].items():
            rb = row.get("rolled_back_share")
            print(f"{name:<11} {label:<24} {row['after_drift']:11.4f} {row['all']:8.4f} {row['s_per_1k']:7.3f} "
                  f"{'' if rb is None else rb:>11}")
    print("\nbars (selfheal vs river, same labels; accuracy difference, MSE and time ratios):")
    for k, v in bars.items():
        ok = v >= 0 if targets[k] == ">= 0" else v <= 1
        print(f"  {k}: {v} ({targets[k]}: {'PASS' if ok else 'SHORT'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tiny": args.tiny, "elapsed_s": time.time() - t0, "pretrain": pre,
                                    "samples": n, "request": REQUEST, "streams": streams, "bars": bars,
                                    "targets": targets}, indent=2))
    print(f"\nwrote {args.out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
