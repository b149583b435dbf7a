"""One model across workers: the same labels fed to 1 worker and to 2 workers, accuracy compared.

For each worker count, starts TorchServe (snapshot interval 1 s), streams rotated
digits (severity 4) in requests of 8 with 10% of them labelled to POST
/feedback/digits (spread over the workers by TorchServe), waits until every
label is absorbed and all workers serve one version, then measures accuracy
on a held-out rotated sample. Writes bench/results/workers.json.

    python scripts/bench_workers.py
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
import yaml

from selfheal_bench.data import as_numpy_list, corrupt, load_digits_split, resample
from selfheal_bench.torchserve import REPO, TorchServe, build_archive
from selfheal_bench.train import save_demo
from selfheal_serving.header import parse_header

log = logging.getLogger("bench_workers")


def run(model_dir: Path, work: Path, workers: int, stream, probe) -> dict:
    config = yaml.safe_load((REPO / "model-config.yaml").read_text())
    config.update(minWorkers=workers, maxWorkers=workers)
    config["handler"]["heal"] = {"snapshot_interval_s": 1.0}
    store = work / f"store{workers}"
    store.mkdir()
    (store / "cfg.yaml").write_text(yaml.safe_dump(config))
    build_archive(model_dir, store, config_file=store / "cfg.yaml")
    x, y = stream
    px, py = probe
    ts = TorchServe(work / f"server{workers}", store, env={"SELFHEAL_SNAPSHOT_DIR": str(work / f"snap{workers}")})
    with ts:
        ts.wait_ready(120, workers=workers)
        g = torch.Generator().manual_seed(0)
        for i in range(0, len(y), 8):
            ts_predict(ts, x[i:i + 8])
            chosen = torch.rand(8, generator=g)[: len(y[i:i + 8])] < 0.10
            if chosen.any():
                r = ts.feedback("digits", {"instances": as_numpy_list(x[i:i + 8][chosen]),
                                           "labels": y[i:i + 8][chosen].tolist()})
                r.raise_for_status()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # all labels absorbed, one version everywhere
            st = ts.feedback("digits", method="get").json()
            versions = {ts_predict(ts, px[:8])[1] for _ in range(12)}
            if st["absorbed"] == st["log"]["last_seq"] and len(versions) == 1:
                break
            time.sleep(1)
        labels = []
        for i in range(0, len(py), 50):
            labels += [p["label"] for p in ts_predict(ts, px[i:i + 50])[0]["predictions"]]
        acc = float((torch.tensor(labels) == py).float().mean())
    return {"workers": workers, "accuracy": acc, "versions_seen": sorted(versions), "labels": st["log"]["entries"]}


def ts_predict(ts: TorchServe, x) -> tuple[dict, int]:
    """The answer's body and the model version its X-Selfheal header names."""
    import requests

    r = requests.post(f"{ts.inference_url}/predictions/digits", json={"instances": as_numpy_list(x)},
                      headers=ts.headers("inference"), timeout=60)
    r.raise_for_status()
    return r.json(), parse_header(r.headers["X-Selfheal"])["version"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "workers.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    work = Path(tempfile.mkdtemp(prefix="bench_workers-"))
    model_dir = work / "model"
    model_dir.mkdir()
    model, _ = save_demo(model_dir)
    _, _, x_te, y_te = load_digits_split(seed=0)
    xs, ys = resample(x_te, y_te, args.samples, seed=21)
    xp, yp = resample(x_te, y_te, 500, seed=22)
    stream, probe = (corrupt(xs, "rotate", 4, seed=21), ys), (corrupt(xp, "rotate", 4, seed=22), yp)
    with torch.no_grad():
        static = float((model(probe[0]).argmax(1) == yp).float().mean())
    rows = [run(model_dir, work, w, stream, probe) for w in (1, 2)]
    print(f"\nstatic model accuracy on the probe: {static:.3f}")
    for r in rows:
        print(f"{r['workers']} worker(s): accuracy {r['accuracy']:.3f}, versions served at the end {r['versions_seen']}, "
              f"labels {r['labels']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"static": static, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
