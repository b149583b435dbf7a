"""Live accuracy without labels: selfheal's estimate (ATC) against the true accuracy and against
the naive average confidence, and the demo stream's clean-phase false alarms.

The digits demo CNN and its 300-digit labelled reference. Streams: the clean test digits and
every Digits-C corruption at severities 1-5, each `--samples` long, resampled from the test
split. Each stream runs through a fresh `SelfHealer` twice: monitoring only (`adapt: false`)
and with label-free correction. In windows of 500 predictions (the estimator's window) the
estimate at the window's end is compared with the true accuracy of the predictions served in
it, and so is the window's average top-class probability (the baseline, same predictions).

Then the demo's stream (600 clean digits, then contrast-5, rotate-4) under the shipped
model-config.yaml settings, 20 seeds, 10% labels one request late as the demo sends them:
`clean_phase_false_alarm_share` is the share of seeds with any drift alarm in the clean phase.

Writes bench/results/estimate.json: mae_points, mae_points_avg_confidence, rows (per stream
and mode), clean_phase_false_alarm_share, clean_phase_flagged_sample_share.

    python scripts/bench_estimate.py          # ~17 min on 2 cores
    python scripts/bench_estimate.py --tiny   # a smoke test
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
import yaml

from selfheal_bench.cbpe import Cbpe, load_nannyml
from selfheal_bench.data import CORRUPTIONS, DEMO_PHASES as PHASES, corrupt, load_digits_split, resample
from selfheal_bench.harness import REPO, RESULTS, Bar, demo_model, smoke, write_report
from selfheal_bench.resnet import ResNet20
from selfheal_bench.tabular import make_mlp
from selfheal_bench.train import fit
from selfheal_core import HealConfig, SelfHealer

log = logging.getLogger("bench_estimate")
WINDOW = 500
REQUEST = 10  # inputs per request in the estimate streams (divides the window)
BATCH = 8  # the demo's requests


def run_stream(model, x_ref, y_ref, x, y, adapt: bool, cbpe: Cbpe | None = None, tiny: bool = False) -> list[dict]:
    """Windows of WINDOW predictions: true accuracy, our estimate at the window's end, average
    confidence, and CBPE's estimate from the same served probabilities (when given)."""
    config = HealConfig.from_dict({"adapt": adapt})
    healer = SelfHealer(copy.deepcopy(model), x_ref, smoke(config) if tiny else config, reference_labels=y_ref)
    rows, correct, probs = [], [], []
    try:
        for i in range(0, len(y), REQUEST):
            p = torch.softmax(healer.predict(x[i:i + REQUEST]), 1)
            correct.append(p.argmax(1) == y[i:i + REQUEST])
            probs.append(p)
            if (i + REQUEST) % WINDOW == 0:
                healer.serving.drain()  # the estimate as the worker's background thread keeps it
                window_probs = torch.cat(probs)
                rows.append({"true": float(torch.cat(correct).float().mean()),
                             "estimated": healer.serving.estimator.estimate,
                             "trusted": healer.status()["accuracy"]["trusted"],
                             "avg_confidence": float(window_probs.max(1).values.mean()),
                             "cbpe": cbpe.estimate(window_probs) if cbpe is not None else None})
                correct, probs = [], []
    finally:
        healer.close()
    return rows


def summarise(name: str, severity: int, adapt: bool, windows: list[dict]) -> dict:
    """One stream's row: its windows and each estimate's mean absolute error, in points."""
    def mae(key: str) -> float | None:
        if any(w[key] is None for w in windows):
            return None
        return sum(abs(w[key] - w["true"]) * 100 for w in windows) / len(windows)

    row = {"stream": name, "severity": severity, "correction": adapt, "windows": windows,
           "true": sum(w["true"] for w in windows) / len(windows), "mae_points": mae("estimated"),
           "mae_points_avg_confidence": mae("avg_confidence"), "mae_points_cbpe": mae("cbpe")}
    log.info("%-17s sev %d %-9s true %.3f  ours %.1f pts  avg-conf %.1f pts  cbpe %s pts", name, severity,
             "corrected" if adapt else "static", row["true"], row["mae_points"], row["mae_points_avg_confidence"],
             "-" if row["mae_points_cbpe"] is None else f"{row['mae_points_cbpe']:.1f}")
    return row


def reference_cbpe(model, x_ref, y_ref) -> Cbpe:
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(x_ref[i:i + 256]), 1) for i in range(0, len(y_ref), 256)])
    return Cbpe(probs, y_ref)


def estimate_table(model, x_ref, y_ref, samples: int, severities: list[int], corruptions: list[str],
                   tiny: bool) -> list[dict]:
    _, _, x_te, y_te = load_digits_split(seed=0)
    streams = [("clean", 0)] + [(c, s) for c in corruptions for s in severities]
    cbpe = reference_cbpe(model, x_ref, y_ref)
    out = []
    for k, (name, sev) in enumerate(streams):
        x, y = resample(x_te, y_te, samples, seed=100 + k)
        if name != "clean":
            x = corrupt(x, name, sev, seed=100 + k)
        for adapt in (False, True):
            out.append(summarise(name, sev, adapt, run_stream(model, x_ref, y_ref, x, y, adapt, cbpe, tiny)))
    return out


def real_table(samples: int, severities: list[int], corruptions: tuple[str, ...], tiny: bool) -> list[dict]:
    """Fashion-MNIST-C (selfheal_bench.real) through the BatchNorm ResNet-20: the clean test images
    and every corruption at `severities`, the first `samples` test images each."""
    from selfheal_bench import real

    if tiny:  # untrained: the plumbing, not the figures
        torch.manual_seed(0)
        _, _, xr, yr = real.split()
        model, x_ref, y_ref = ResNet20(width=8).eval(), real.as_tensor(xr[:200]), torch.tensor(yr[:200])
    else:
        model, x_ref, y_ref, _ = real.trained("batch")
    cbpe = reference_cbpe(model, x_ref, y_ref)
    out = []
    for name, sev in [("clean", 0)] + [(c, s) for c in corruptions for s in severities]:
        x, y = real.corrupted(name, sev, samples)
        for adapt in (False, True):
            windows = run_stream(model, x_ref, y_ref, real.as_tensor(x), torch.tensor(y), adapt, cbpe, tiny)
            out.append(summarise(f"fmnist:{name}", sev, adapt, windows))
    return out


def housing_rows(tiny: bool) -> list[dict]:
    """NannyML's California housing set (high value or not, from 8 features; a reference period and
    an analysis period whose accuracy swings month by month): an MLP trained on the first half of
    the reference period, the second half as selfheal's and CBPE's reference, the analysis period
    in time order in windows of WINDOW."""
    nml, _ = load_nannyml()
    ref, ana, tgt = nml.load_modified_california_housing_dataset()
    features = ["MedInc", "HouseAge", "AveRooms", "AveBedrms", "Population", "AveOccup", "Latitude", "Longitude"]
    ana = ana.merge(tgt, on="id").sort_values("timestamp")
    ref = ref.sort_values("timestamp")
    x_all = torch.tensor(ref[features].to_numpy(), dtype=torch.float32)
    y_all = torch.tensor(ref["clf_target"].to_numpy(), dtype=torch.long)
    half = len(y_all) // 2
    x_fit, y_fit, x_ref, y_ref = x_all[:half], y_all[:half], x_all[half:], y_all[half:]
    torch.manual_seed(0)
    model = fit(make_mlp(len(features), 2, False, x_fit), x_fit, y_fit, 5 if tiny else 60, lr=1e-3, seed=0)
    x = torch.tensor(ana[features].to_numpy(), dtype=torch.float32)
    y = torch.tensor(ana["clf_target"].to_numpy(), dtype=torch.long)
    if tiny:
        x, y = x[:WINDOW * 2], y[:WINDOW * 2]
    n = (len(y) // WINDOW) * WINDOW
    cbpe = reference_cbpe(model, x_ref, y_ref)
    return [summarise("housing", 0, adapt, run_stream(model, x_ref, y_ref, x[:n], y[:n], adapt, cbpe, tiny))
            for adapt in (False, True)]


def demo_false_alarms(model, x_ref, y_ref, seeds: int, tiny: bool, feedback_rate: float = 0.10) -> dict:
    """The demo's clean phase under the shipped model-config.yaml, `seeds` streams: alarms before its end."""
    settings = yaml.safe_load((REPO / "model-config.yaml").read_text())["handler"].get("heal", {})
    config = HealConfig.from_dict({**settings, "snapshot_interval_s": 0.0})
    config = smoke(config) if tiny else config
    _, _, x_te, y_te = load_digits_split(seed=0)
    clean_n = PHASES[0][3]
    with_alarm, flagged = 0, 0
    for seed in range(seeds):
        x, y = resample(x_te, y_te, clean_n, seed=seed)  # the demo's clean phase for this seed
        healer = SelfHealer(copy.deepcopy(model), x_ref, config, reference_labels=y_ref)
        g = torch.Generator().manual_seed(seed)
        alarmed, pending = False, None
        try:
            for i in range(0, clean_n, BATCH):
                xb, yb = x[i:i + BATCH], y[i:i + BATCH]
                served = healer.predict(xb).argmax(1)
                healer.serving.drain()
                if pending is not None:  # labels one request late, as the demo sends them
                    healer.feedback(*pending[:2], served=pending[2])
                chosen = torch.rand(len(yb), generator=g) < feedback_rate
                pending = (xb[chosen], yb[chosen], served[chosen]) if chosen.any() else None
                drifting = healer.status()["drift"]["detected"]
                alarmed |= drifting
                flagged += int(drifting) * len(yb)
        finally:
            healer.close()
        with_alarm += int(alarmed)
        log.info("demo clean phase, seed %d: %s", seed, "ALARM" if alarmed else "quiet")
    return {"clean_phase_false_alarm_share": with_alarm / seeds,
            "clean_phase_flagged_sample_share": flagged / (seeds * clean_n), "seeds": seeds,
            "expected_run_time": config.monitor.expected_run_time}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "estimate.json")
    ap.add_argument("--samples", type=int, default=1000, help="per stream (windows of 500)")
    ap.add_argument("--seeds", type=int, default=20, help="demo clean-phase seeds")
    ap.add_argument("--real-samples", type=int, default=500, help="per Fashion-MNIST-C stream (one window)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--demo-only", action="store_true",
                    help="only the demo's clean phase; the estimate rows are kept from the JSON at --out")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    t0 = time.time()
    torch.manual_seed(0)
    model, x_ref, y_ref = demo_model(0)
    corruptions = sorted(CORRUPTIONS)
    severities = [1, 2, 3, 4, 5]
    if args.tiny:
        corruptions, severities, args.samples, args.seeds = corruptions[:1], [5], 500, 1
    if args.demo_only:
        kept = json.loads(args.out.read_text())
        rows, real_rows, housing = kept["rows"], kept["real"]["rows"], kept["housing"]["rows"]
    else:
        rows = estimate_table(model, x_ref, y_ref, args.samples, severities, corruptions, args.tiny)
        from selfheal_bench import real

        real_rows = real_table(WINDOW if args.tiny else args.real_samples, [5] if args.tiny else severities,
                               real.CORRUPTIONS[:1] if args.tiny else real.CORRUPTIONS, args.tiny)
        housing = housing_rows(args.tiny)
    mae = sum(r["mae_points"] for r in rows) / len(rows)
    base = sum(r["mae_points_avg_confidence"] for r in rows) / len(rows)
    demo = demo_false_alarms(model, x_ref, y_ref, args.seeds, args.tiny)
    print(f"\n{'stream':>17} {'sev':>3} {'correction':>10} {'true':>6} {'ours':>6} {'avg-conf':>8} {'cbpe':>6}"
          "  (MAE, points)")
    for r in rows + real_rows + housing:
        print(f"{r['stream']:>17} {r['severity']:>3} {str(r['correction']):>10} {r['true']:6.3f} "
              f"{r['mae_points']:6.1f} {r['mae_points_avg_confidence']:8.1f} {r['mae_points_cbpe']:6.1f}")
    print(f"{'digits, all':>17} {'':>3} {'':>10} {'':>6} {mae:6.1f} {base:8.1f}")
    print(f"\ndemo clean phase: alarm in {demo['clean_phase_false_alarm_share']:.0%} of {demo['seeds']} seeds, "
          f"{demo['clean_phase_flagged_sample_share']:.1%} of its samples flagged")
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    real_summary = {"mae_points": mean(real_rows, "mae_points"), "cbpe_mae_points": mean(real_rows, "mae_points_cbpe"),
                    "avg_confidence_mae_points": mean(real_rows, "mae_points_avg_confidence"), "rows": real_rows,
                    "samples_per_stream": WINDOW if args.tiny else args.real_samples}
    housing_summary = {"mae_points": mean(housing, "mae_points"), "cbpe_mae_points": mean(housing, "mae_points_cbpe"),
                       "avg_confidence_mae_points": mean(housing, "mae_points_avg_confidence"), "rows": housing}
    bars = [Bar("estimate MAE, points", mae, "<=", 5.0),
            Bar("estimate MAE / average-confidence MAE", mae / base if base else None, "<=", 0.5),
            Bar("demo clean phase: seeds with a false alarm (share)", demo["clean_phase_false_alarm_share"], "<=", 0.1),
            Bar("Fashion-MNIST-C: estimate MAE, points", real_summary["mae_points"], "<=", 5.0),
            Bar("Fashion-MNIST-C: estimate MAE / CBPE's", real_summary["mae_points"] / real_summary["cbpe_mae_points"]
                if real_summary["cbpe_mae_points"] else None, "<=", 0.5),
            Bar("California housing: estimate MAE / CBPE's", housing_summary["mae_points"]
                / housing_summary["cbpe_mae_points"] if housing_summary["cbpe_mae_points"] else None, "<=", 1.0)]
    write_report(args.out, bars, t0, mae_points=mae, mae_points_avg_confidence=base, rows=rows, window=WINDOW,
                 samples_per_stream=args.samples, real=real_summary, housing=housing_summary, **demo)


if __name__ == "__main__":
    main()
