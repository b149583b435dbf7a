"""The demo: serve the digits CNN with TorchServe, drift it, watch it heal.

Trains the model (if needed), archives it into model_store/ with
torch-model-archiver, starts TorchServe on loopback (token auth on), replays a
stream over REST (clean digits, then contrast-corrupted ones that label-free
healing fixes, then rotated ones that need labels), posts labelled feedback for
a fraction of predictions by id, prints windowed accuracy of the static model
vs. the served self-healing model, writes a plot and stops its server.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import requests
import torch

from selfheal_bench.data import as_numpy_list, corrupt, load_digits_split, resample
from selfheal_bench.models import DigitsCNN
from selfheal_bench.torchserve import REPO, TorchServe, build_archive

log = logging.getLogger("demo")

PHASES = [  # (name, corruption, severity, samples)
    ("clean", None, 0, 600),
    ("contrast-5", "contrast", 5, 1200),
    ("rotate-4", "rotate", 4, 1500),
]


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


def replay(ts: TorchServe, x, y, batch: int, feedback_rate: float, seed: int) -> dict:
    """Send the stream in requests of `batch`; feedback by id for a random fraction, one request later,
    to POST /feedback/digits on the management port with the management key."""
    url = f"{ts.inference_url}/predictions/digits"
    feedback_url = f"{ts.management_url}/feedback/digits"
    headers, management = ts.headers("inference"), ts.headers("management")
    g = torch.Generator().manual_seed(seed)
    served, versions, drift, pending = [], [], [], []
    with requests.Session() as http:
        for i in range(0, len(y), batch):
            r = http.post(url, json={"instances": as_numpy_list(x[i:i + batch])}, headers=headers, timeout=30)
            r.raise_for_status()
            out = r.json()
            served += [p["label"] for p in out["predictions"]]
            versions.append(out["model_version"])
            drift += [out["drift"]["detected"]] * len(out["predictions"])
            if pending:  # labels arrive one request late, as from a labelling system
                fb = http.post(feedback_url, json={"feedback": pending}, timeout=30, headers=management)
                fb.raise_for_status()
            chosen = torch.rand(len(out["predictions"]), generator=g) < feedback_rate
            pending = [{"id": p["id"], "label": int(y[i + j])}
                       for j, p in enumerate(out["predictions"]) if chosen[j]]
    return {"served": torch.tensor(served), "versions": versions, "drift": drift}


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
        from train_demo import main as train_main  # noqa: E402  (scripts/ is on sys.path when run as a script)

        sys.argv = [sys.argv[0], "--out", str(model_dir)]
        train_main()
    mar = build_archive(model_dir, REPO / "model_store")
    log.info("archived %s", mar)
    snapshots = REPO / "model_store" / "snapshots"
    shutil.rmtree(snapshots / "digits", ignore_errors=True)  # the demo starts from the source model
    static = DigitsCNN()
    static.load_state_dict(torch.load(model_dir / "digits_cnn.pt", weights_only=True))
    static.eval()
    x, y, phase = make_stream(args.seed)
    ts = TorchServe(args.out / "server", REPO / "model_store",
                    env={"SELFHEAL_SNAPSHOT_DIR": str(snapshots)})
    with ts:
        log.info("TorchServe up: inference %s, management %s", ts.inference_url, ts.management_url)
        result = replay(ts, x, y, args.batch, args.feedback_rate, args.seed)
        status = requests.get(f"{ts.management_url}/models/digits?customized=true",
                              headers=ts.headers("management"), timeout=30).json()[0]["customizedMetadata"]
    with torch.no_grad():
        static_ok = static(x).argmax(1) == y
    served_ok = result["served"] == y
    report(args, phase, static_ok, served_ok, result, status, time.time() - t0)


def report(args, phase, static_ok, served_ok, result, status, elapsed) -> None:
    """Print the table, write the plot and a JSON summary."""
    w = args.window
    rows = []
    print(f"\n{'window':>12} {'phase':>11} {'static':>7} {'selfheal':>9} {'drift':>6}")
    for k, (s_acc, h_acc) in enumerate(zip(windows(static_ok, w), windows(served_ok, w))):
        lo, hi = k * w, min((k + 1) * w, len(phase))
        name = PHASES[phase[lo]][0]
        drifted = sum(result["drift"][lo:hi]) / (hi - lo)
        rows.append({"start": lo, "phase": name, "static": s_acc, "selfheal": h_acc})
        print(f"{lo:>5}-{hi:<6} {name:>11} {s_acc:7.3f} {h_acc:9.3f} {drifted:6.0%}")
    print(f"\n{'phase':>11} {'static':>7} {'selfheal':>9}")
    summary = {}
    ph = torch.tensor(phase)
    for i, (name, *_rest) in enumerate(PHASES):
        m = ph == i
        summary[name] = {"static": static_ok[m].float().mean().item(), "selfheal": served_ok[m].float().mean().item()}
        print(f"{name:>11} {summary[name]['static']:7.3f} {summary[name]['selfheal']:9.3f}")
    drifted = ph > 0
    summary["corrupted"] = {"static": static_ok[drifted].float().mean().item(),
                            "selfheal": served_ok[drifted].float().mean().item()}
    print(f"{'corrupted':>11} {summary['corrupted']['static']:7.3f} {summary['corrupted']['selfheal']:9.3f}")
    print(f"\nfinal model_version {status['version']}, drift {status['drift']}, guard {status['guard']}, "
          f"{elapsed:.0f}s in all")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps({"windows": rows, "phases": summary, "status": status,
                                                     "feedback_rate": args.feedback_rate}, indent=2))
    plot(args.out / "demo_accuracy.png", rows, w)
    print(f"wrote {args.out / 'demo_accuracy.png'} and {args.out / 'demo.json'}")


def plot(path: Path, rows: list[dict], w: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["start"] + w / 2 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(xs, [r["static"] for r in rows], "o-", label="static model")
    ax.plot(xs, [r["selfheal"] for r in rows], "o-", label="selfheal (served)")
    start = 0
    for name, _, _, n in PHASES:
        ax.axvspan(start, start + n, alpha=0.08 if name == "clean" else 0.15, color="gray" if name == "clean" else "red")
        ax.text(start + n / 2, 0.03, name, ha="center")
        start += n
    ax.set(xlabel="samples", ylabel=f"accuracy (windows of {w})", ylim=(0, 1.02), title="selfheal demo")
    ax.legend(loc="lower left", bbox_to_anchor=(0, 0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
