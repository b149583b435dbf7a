"""Bring your own model, measured: the example user models served by a real TorchServe.

For each of (a) images sent as bytes through an 8-line handler, (b) a tabular MLP with
LayerNorm and constructor arguments, (c) a regression model (remaining useful life) and
(d) the images model as TorchScript (monitor-only): the README's commands build the
reference and the .mar (`selfheal reference`, `selfheal archive`), TorchServe serves it,
a clean stream measures the share of responses flagged as drifting, then a shifted stream
is served one input per request with 10% of the answers labelled by id one request later.
Static is the same model without selfheal on the same inputs. Windows of 200.

Writes bench/results/byom.json: models.<name>.{task, static, served, last_window_static,
last_window_served, lower_is_better, clean_flagged_share, handler_lines, config_lines}.

    python scripts/bench_byom.py            # ~10 min on 2 cores
    python scripts/bench_byom.py --tiny     # a smoke test
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from selfheal_bench.data import corrupt
from selfheal_bench.examples import data
from selfheal_bench.examples.__main__ import write
from selfheal_bench.harness import REPO, RESULTS, Bar, write_report
from selfheal_bench.torchserve import TorchServe
from selfheal_serving.header import parse_header

log = logging.getLogger("bench_byom")
EXAMPLES = REPO / "selfheal_bench" / "examples"
SELFHEAL = str(Path(sys.executable).with_name("selfheal"))
WINDOW = 200
MODELS = {  # name: (example, archive arguments beyond the common ones, task, user settings given)
    "images": ("images", ["--model-file", str(REPO / "selfheal_bench" / "models.py"), "--weights", "weights.pt",
                          "--handler", str(EXAMPLES / "image_handler.py")], "classification", 0),
    "tabular": ("tabular", ["--model-file", str(EXAMPLES / "tabular_model.py"), "--weights", "weights.pt",
                            "--model-kwargs", json.dumps(data.TABULAR)], "classification", 1),
    "rul": ("rul", ["--model-file", str(EXAMPLES / "rul_model.py"), "--weights", "weights.pt",
                    "--model-kwargs", json.dumps(data.RUL), "--task", "regression"], "regression", 2),
    "scripted": ("torchscript", ["--weights", "model.pt"], "classification", 0),
}


def run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr[-2000:]}")


def streams(name: str, n_clean: int, n_shifted: int):
    """(clean bodies, shifted bodies, shifted targets, the static model's shifted outputs)."""
    if name in ("images", "scripted"):
        model, _ = data.train_images()
        clean_blobs, _ = data.images(rotate=0.0, n=n_clean, seed=21)
        if name == "images":
            blobs, y = data.images(rotate=40.0, n=n_shifted, seed=22)
            x = torch.stack([data.decode_image(b) for b in blobs])
            return [("raw", b) for b in clean_blobs], [("raw", b) for b in blobs], y, model, x
        clean = torch.stack([data.decode_image(b) for b in clean_blobs])
        blobs, y = data.images(rotate=0.0, n=n_shifted, seed=22)
        x = corrupt(torch.stack([data.decode_image(b) for b in blobs]), "contrast", 5, seed=22)
        return [("json", {"instances": clean[i:i + 1].tolist()}) for i in range(n_clean)], \
            [("json", {"instances": x[i:i + 1].tolist()}) for i in range(n_shifted)], y, model, x
    model, _ = data.train_tabular() if name == "tabular" else data.train_rul()
    gen = data.tabular if name == "tabular" else data.rul
    clean, shifted = gen(n_clean, seed=21), gen(n_shifted, seed=22, shift=True)
    return [("json", {"instances": clean.x[i:i + 1].tolist()}) for i in range(n_clean)], \
        [("json", {"instances": shifted.x[i:i + 1].tolist()}) for i in range(n_shifted)], shifted.y, model, shifted.x


def answer_of(body, task: str) -> float:
    if "digit" in body:
        return body["digit"]
    pred = body["predictions"][0]
    return pred["value"] if task == "regression" else pred["label"]


def serve(name: str, store: Path, work: Path, clean: list, shifted: list, y: torch.Tensor, task: str) -> dict:
    ts = TorchServe(work / "server", store, models=f"{name}={name}.mar", env={"SELFHEAL_SNAPSHOT_DIR": str(work / "s")})
    url = lambda: f"{ts.inference_url}/predictions/{name}"  # noqa: E731
    flagged, served, pending = 0, [], None
    import requests

    with ts, requests.Session() as http:
        def send(kind_body):
            kind, body = kind_body
            headers = ts.headers("inference")
            if kind == "raw":
                r = http.post(url(), data=body, headers={**headers, "Content-Type": "application/octet-stream"},
                              timeout=60)
            else:
                r = http.post(url(), json=body, headers=headers, timeout=60)
            r.raise_for_status()
            return r.json(), parse_header(r.headers["X-Selfheal"])

        for body in clean:
            flagged += send(body)[1]["drift"]
        for i, body in enumerate(shifted):
            answer, state = send(body)
            served.append(answer_of(answer, task))
            if pending:
                ts.feedback(name, {"feedback": [pending]}).raise_for_status()
            key, value = ("target", float(y[i][0])) if task == "regression" else ("label", int(y[i]))
            pending = {"id": state["ids"][0], key: value} if i % 10 == 0 else None
    return {"clean_flagged_share": flagged / len(clean), "served": torch.tensor(served, dtype=torch.float64)}


def score(pred: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Per sample: correct (1/0) for classifiers, squared error for regression."""
    if task == "regression":
        return (pred.double().flatten() - y.double().flatten()) ** 2
    return (pred.long().flatten() == y.long().flatten()).double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "byom.json")
    ap.add_argument("--clean", type=int, default=300)
    ap.add_argument("--shifted", type=int, default=1000)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.tiny:
        args.clean, args.shifted = 40, 200
    t0 = time.time()
    results, bars = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "model-config.yaml"
        config.write_text((REPO / "model-config.yaml").read_text())
        for name, (example, extra, task, settings) in MODELS.items():
            d = root / example
            write(example, d)
            model_args = [str(d / a) if a in ("weights.pt", "model.pt") else a for a in extra]
            check = [a for a in model_args if a != "--handler" and not a.endswith("image_handler.py")]
            run(SELFHEAL, "reference", "--inputs", str(d / "val.npz"), "--inputs-key", "x", "--labels",
                str(d / "val.npz"), "--labels-key", "y", "--out", str(d / "reference.pt"), *check)
            run(SELFHEAL, "archive", "--name", name, "--reference", str(d / "reference.pt"), "--config", str(config),
                "--export-path", str(root / "store"), *model_args)
            clean, shifted, y, model, x = streams(name, args.clean, args.shifted)
            got = serve(name, root / "store", root / f"work-{name}", clean, shifted, y, task)
            with torch.no_grad():
                out = model.eval()(x)
            static_pred = out.flatten() if task == "regression" else out.argmax(1)
            s_static, s_served = score(static_pred, y, task), score(got["served"], y, task)
            handler = (EXAMPLES / "image_handler.py").read_text().splitlines() if name == "images" else []
            r = {"task": task, "lower_is_better": task == "regression",
                 "static": float(s_static.mean()), "served": float(s_served.mean()),
                 "last_window_static": float(s_static[-WINDOW:].mean()),
                 "last_window_served": float(s_served[-WINDOW:].mean()),
                 "windows_static": [float(s_static[i:i + WINDOW].mean()) for i in range(0, len(y), WINDOW)],
                 "windows_served": [float(s_served[i:i + WINDOW].mean()) for i in range(0, len(y), WINDOW)],
                 "clean_flagged_share": got["clean_flagged_share"],
                 "handler_lines": sum(1 for line in handler if line.strip()), "config_lines": settings}
            results[name] = r
            log.info("%s: %s", name, {k: v for k, v in r.items() if not k.startswith("windows")})
            if name != "scripted":  # (a)-(c): the bars
                better = r["last_window_served"] < r["last_window_static"] if task == "regression" \
                    else r["last_window_served"] > r["last_window_static"]
                bars += [Bar(f"{name}: served last window better than static", better, "==", True),
                         Bar(f"{name}: clean stream flagged share", r["clean_flagged_share"], "<=", 0.05)]
        bars.append(Bar("images: handler lines", results["images"]["handler_lines"], "<=", 10))
    print(f"\n{'model':>9} {'task':>14} {'static':>8} {'served':>8} {'last static':>11} {'last served':>11} "
          f"{'clean flagged':>13}")
    for name, r in results.items():
        print(f"{name:>9} {r['task']:>14} {r['static']:8.3f} {r['served']:8.3f} {r['last_window_static']:11.3f} "
              f"{r['last_window_served']:11.3f} {r['clean_flagged_share']:13.3f}")
    write_report(args.out, bars, t0, models=results, window=WINDOW, feedback_rate=0.10,
                 shifted_samples=args.shifted, clean_samples=args.clean)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
