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

    python scripts/bench_estimate.py          # ~6 min on 2 cores
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

from selfheal_bench.data import CORRUPTIONS, DEMO_PHASES as PHASES, corrupt, load_digits_split, resample
from selfheal_bench.harness import REPO, RESULTS, Bar, demo_model, write_report
from selfheal_core import HealConfig, SelfHealer

log = logging.getLogger("bench_estimate")
WINDOW = 500
REQUEST = 10  # inputs per request in the estimate streams (divides the window)
BATCH = 8  # the demo's requests


def run_stream(model, x_ref, y_ref, x, y, adapt: bool) -> list[dict]:
    """Windows of WINDOW predictions: true accuracy, our estimate at the window's end, average confidence."""
    healer = SelfHealer(copy.deepcopy(model), x_ref, HealConfig.from_dict({"adapt": adapt}), reference_labels=y_ref)
    rows, correct, conf = [], [], []
    try:
        for i in range(0, len(y), REQUEST):
            probs = torch.softmax(healer.predict(x[i:i + REQUEST]), 1)
            c, served = probs.max(1)
            correct.append(served == y[i:i + REQUEST])
            conf.append(c)
            if (i + REQUEST) % WINDOW == 0:
                healer.serving.drain()  # the estimate as the worker's background thread keeps it
                window_correct, window_conf = torch.cat(correct), torch.cat(conf)
                rows.append({"true": float(window_correct.float().mean()),
                             "estimated": healer.serving.estimator.estimate,
                             "avg_confidence": float(window_conf.mean())})
                correct, conf = [], []
    finally:
        healer.close()
    return rows


def estimate_table(model, x_ref, y_ref, samples: int, severities: list[int], corruptions: list[str]) -> list[dict]:
    _, _, x_te, y_te = load_digits_split(seed=0)
    streams = [("clean", 0)] + [(c, s) for c in corruptions for s in severities]
    out = []
    for k, (name, sev) in enumerate(streams):
        x, y = resample(x_te, y_te, samples, seed=100 + k)
        if name != "clean":
            x = corrupt(x, name, sev, seed=100 + k)
        for adapt in (False, True):
            windows = run_stream(model, x_ref, y_ref, x, y, adapt)
            err = [abs(w["estimated"] - w["true"]) * 100 for w in windows]
            base = [abs(w["avg_confidence"] - w["true"]) * 100 for w in windows]
            row = {"stream": name, "severity": sev, "correction": adapt, "windows": windows,
                   "true": sum(w["true"] for w in windows) / len(windows),
                   "mae_points": sum(err) / len(err), "mae_points_avg_confidence": sum(base) / len(base)}
            out.append(row)
            log.info("%-15s sev %d %-9s true %.3f  ours %.1f pts  avg-conf %.1f pts", name, sev,
                     "corrected" if adapt else "static", row["true"], row["mae_points"],
                     row["mae_points_avg_confidence"])
    return out


def demo_false_alarms(model, x_ref, y_ref, seeds: int, feedback_rate: float = 0.10) -> dict:
    """The demo's clean phase under the shipped model-config.yaml, `seeds` streams: alarms before its end."""
    settings = yaml.safe_load((REPO / "model-config.yaml").read_text())["handler"].get("heal", {})
    config = HealConfig.from_dict({**settings, "snapshot_interval_s": 0.0})
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
        corruptions, severities, args.samples, args.seeds = corruptions[:1], [5], 500, 2
    if args.demo_only:
        rows = json.loads(args.out.read_text())["rows"]
    else:
        rows = estimate_table(model, x_ref, y_ref, args.samples, severities, corruptions)
    mae = sum(r["mae_points"] for r in rows) / len(rows)
    base = sum(r["mae_points_avg_confidence"] for r in rows) / len(rows)
    demo = demo_false_alarms(model, x_ref, y_ref, args.seeds)
    print(f"\n{'stream':>15} {'sev':>3} {'correction':>10} {'true':>6} {'ours':>6} {'avg-conf':>8}  (MAE, points)")
    for r in rows:
        print(f"{r['stream']:>15} {r['severity']:>3} {str(r['correction']):>10} {r['true']:6.3f} "
              f"{r['mae_points']:6.1f} {r['mae_points_avg_confidence']:8.1f}")
    print(f"{'all':>15} {'':>3} {'':>10} {'':>6} {mae:6.1f} {base:8.1f}")
    print(f"\ndemo clean phase: alarm in {demo['clean_phase_false_alarm_share']:.0%} of {demo['seeds']} seeds, "
          f"{demo['clean_phase_flagged_sample_share']:.1%} of its samples flagged")
    bars = [Bar("estimate MAE, points", mae, "<=", 5.0),
            Bar("estimate MAE / average-confidence MAE", mae / base if base else None, "<=", 0.5),
            Bar("demo clean phase: seeds with a false alarm (share)", demo["clean_phase_false_alarm_share"], "<=", 0.1)]
    write_report(args.out, bars, t0, mae_points=mae, mae_points_avg_confidence=base, rows=rows, window=WINDOW,
                 samples_per_stream=args.samples, **demo)


if __name__ == "__main__":
    main()
