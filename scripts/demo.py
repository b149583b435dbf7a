"""The demo: serve the digits CNN with TorchServe, drift it, watch it heal.

Trains the model (if needed), archives it into model_store/ with
torch-model-archiver, starts TorchServe on loopback (token auth on), replays a
stream with `selfheal replay` (clean digits, then contrast-corrupted ones that
label-free healing fixes, then rotated ones that need labels; labelled feedback
for a fraction of predictions by id, one request late), prints windowed accuracy
of the static model vs. the served self-healing model and its live estimate,
writes a plot and stops its server.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import requests
import torch

from selfheal_bench.data import DEMO_PHASES, corrupt, load_digits_split, resample
from selfheal_bench.models import DigitsCNN
from selfheal_bench.torchserve import REPO, TorchServe, build_archive
from selfheal_bench.train import save_demo
from selfheal_torchserve import replay

log = logging.getLogger("demo")

PHASES = DEMO_PHASES


def make_stream(seed: int = 0):
    """Concatenated phases resampled from the test split: (x, y, phase index per sample)."""
    _, _, x_te, y_te = load_digits_split(seed=0)
    xs, ys, ph = [], [], []
    for i, (_, name, sev, n) in enumerate(PHASES):
        x, y = resample(x_te, y_te, n, seed=seed + i)
        xs.append(corrupt(x, name, sev, seed=seed + i) if name else x)
        ys.append(y)
        ph += [i] * n
    return torch.cat(xs), torch.cat(ys), ph


def windows(correct: torch.Tensor, size: int) -> list[float]:
    return [correct[i:i + size].float().mean().item() for i in range(0, len(correct), size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=REPO / "demo_out")
    ap.add_argument("--feedback-rate", type=float, default=0.10)
    ap.add_argument("--batch", type=int, default=8, help="instances per request")
    ap.add_argument("--window", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    t0 = time.time()
    model_dir = REPO / "build" / "model"
    if not (model_dir / "digits_cnn.pt").exists():
        save_demo(model_dir)
    mar = build_archive(model_dir, REPO / "model_store")
    log.info("archived %s", mar)
    snapshots = REPO / "model_store" / "snapshots"
    shutil.rmtree(snapshots / "digits", ignore_errors=True)  # the demo starts from the source model
    static = DigitsCNN()
    static.load_state_dict(torch.load(model_dir / "digits_cnn.pt", weights_only=True))
    static.eval()
    x, y, phase = make_stream(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    # The stream as a file `selfheal replay` reads: the demo is one use of it.
    np.savez(args.out / "stream.npz", x=x.numpy(), y=y.numpy(), phase=np.array([PHASES[p][0] for p in phase]))
    stream = replay.load_stream(args.out / "stream.npz")
    ts = TorchServe(args.out / "server", REPO / "model_store",
                    env={"SELFHEAL_SNAPSHOT_DIR": str(snapshots)})
    with ts:
        log.info("TorchServe up: inference %s, management %s", ts.inference_url, ts.management_url)
        keys = ts.keys()
        cfg = replay.ReplayConfig(ts.inference_url, ts.management_url, "digits", args.batch, args.feedback_rate,
                                  feedback_delay=1, inference_key=keys.get("inference"),
                                  management_key=keys.get("management"), seed=args.seed)
        trace = replay.replay(stream, cfg)
        status = requests.get(f"{ts.management_url}/models/digits?customized=true",
                              headers=ts.headers("management"), timeout=30).json()[0]["customizedMetadata"]
    with torch.no_grad():
        static_ok = static(x).argmax(1) == y
    summary = replay.summarize(stream, trace, args.window)
    served_ok = torch.tensor(trace.served) == y
    report(args, phase, static_ok, served_ok, summary, status, time.time() - t0)


def report(args, phase, static_ok, served_ok, summary, status, elapsed) -> None:
    """Print the table, write the plot and a JSON summary."""
    w = args.window
    rows = []
    static_windows = windows(static_ok, w)
    print(f"\n{'window':>12} {'phase':>11} {'static':>7} {'selfheal':>9} {'estimated':>10} {'drift':>6}")
    for s_acc, win in zip(static_windows, summary["windows"]):
        lo, hi, name = win["start"], win["end"], win["phase"]
        est = f"{win['estimated']:10.3f}" if win["estimated"] is not None else f"{'-':>10}"
        rows.append({"start": lo, "phase": name, "static": s_acc, "selfheal": win["observed"],
                     "estimated": win["estimated"], "drift": win["drift"], "version": win["version"]})
        print(f"{lo:>5}-{hi:<6} {name:>11} {s_acc:7.3f} {win['observed']:9.3f} {est} {win['drift']:6.0%}")
    print(f"\n{'phase':>11} {'static':>7} {'selfheal':>9}")
    by_phase = {}
    ph = torch.tensor(phase)
    for i, (name, *_rest) in enumerate(PHASES):
        m = ph == i
        by_phase[name] = {"static": static_ok[m].float().mean().item(), "selfheal": served_ok[m].float().mean().item()}
        print(f"{name:>11} {by_phase[name]['static']:7.3f} {by_phase[name]['selfheal']:9.3f}")
    drifted = ph > 0
    by_phase["corrupted"] = {"static": static_ok[drifted].float().mean().item(),
                             "selfheal": served_ok[drifted].float().mean().item()}
    print(f"{'corrupted':>11} {by_phase['corrupted']['static']:7.3f} {by_phase['corrupted']['selfheal']:9.3f}")
    learner = status.get("learner") or {}
    print(f"\nfinal model_version {status['version']}, drift {status['drift']['firing']}, "
          f"guard {learner.get('guard')}, label delay {learner.get('label_delay')}, {elapsed:.0f}s in all")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps({"windows": rows, "phases": by_phase, "status": status,
                                                     "feedback_rate": args.feedback_rate}, indent=2))
    replay.plot(summary, args.out / "demo_accuracy.png", title="selfheal demo: digits CNN on TorchServe",
                baseline=static_windows)
    print(f"wrote {args.out / 'demo_accuracy.png'} and {args.out / 'demo.json'}")


if __name__ == "__main__":
    main()
