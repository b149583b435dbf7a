"""Production scale (issue 28): labels that arrive days later, resolved from the prediction record.

Delayed labels, the digits CNN with the shipped defaults (`HealConfig()`, the
record's default retention of 30 days and byte budget of 2 GiB), wired as a
server wires it: a worker's `ServingModel` records every prediction in a
SQLite prediction record, labels by id go through `Intake` into the feedback
log, and a `Learner` absorbs them and publishes to the worker.

- 200,000 predictions in requests of 64: the first 10,000 on clean digits,
  served (and recorded) 7 days ago; the other 190,000 on a shifted domain,
  served now. Label-free correction follows the shift.
- Then labels for 2,000 of the first 10,000 predictions, by id, 64 per
  request. `delayed_resolved_share`: the share of ids that resolve.
- `delayed_current_accuracy_drop_points`: accuracy on a probe of the current
  domain before the delayed labels minus after they were learned (or judged
  to be from a past domain and kept out).
- Shifts: rotate 4, contrast 4, brightness 4, pixelate 3, Gaussian noise 3
  (the bar is the worst); and a control with no shift, where the week-old
  labels are of the domain still served and are learned.
- The same with the past-domain judgement off (`past_alpha` 0, named as
  such): what learning every old label costs.

A 224x224 ResNet-18 served end to end (`--resnet-requests`, default 20,000):
11.2M parameters (random weights, seeded: cost, not accuracy), archived with
`selfheal reference` / `selfheal archive` and an image handler like the
README's (`selfheal_bench/examples/image224_handler.py`), served by TorchServe
with the shipped settings, one JPEG per request; the second half brightened
and contrast-reduced (drift); 5% of answers labelled by id one request later
(labels: the model's own answer on the clean image). Measured: the worker's
RSS growth from after the first 5% of requests to the end
(`scale.worker_rss_growth_mb`), the learner's RSS at the end
(`scale.learner_rss_mb`, against 3x the model's size + 500 MB), and the bytes a
worker reads per publish (the published record's size) against the published
weights' size (`scale.publish_bytes_per_worker_ratio`) and against the whole
model's.

    python scripts/bench_scale.py           # ~30 min on 2 cores (the ResNet: ~25)
    python scripts/bench_scale.py --tiny    # a smoke run (delayed labels only)
    python scripts/bench_scale.py --tiny --resnet-requests 60   # ... and the ResNet briefly (~2 min)
    python scripts/bench_scale.py --resnet-requests 0           # delayed labels only
"""
from __future__ import annotations

import copy
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from selfheal_bench.data import corrupt, load_digits_split
from selfheal_bench.harness import Bar, bench_parser, demo_model, smoke, write_report
from selfheal_core import HealConfig, Learner
from selfheal_core.intake import Intake
from selfheal_core.serving import ServingModel
from selfheal_core.storage import open_storage

log = logging.getLogger("bench_scale")
REQUEST = 64
WEEK = 7 * 86400.0
SHIFTS = (("rotate", 4), ("contrast", 4), ("brightness", 4), ("pixelate", 3), ("gaussian_noise", 3), (None, 0))


def _requests(pool: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(pool), (n,), generator=gen)
    return [pool[idx[i:i + REQUEST]] for i in range(0, n, REQUEST)], idx


@torch.no_grad()
def _accuracy(serving: ServingModel, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of what serving answers now for a probe of the current domain (served as traffic:
    360 more samples of the domain it has adapted to over 190,000)."""
    out = torch.cat([serving.predict(x[i:i + REQUEST]) for i in range(0, len(x), REQUEST)])
    return float((out.argmax(1) == y).float().mean())


def delayed(model, x_ref, y_ref, x_pool, y_pool, shift, config: HealConfig, sizes: dict, work: Path,
            seed: int) -> dict:
    storage = open_storage("digits", work)
    record = storage.open_record()
    serving = ServingModel(copy.deepcopy(model), x_ref, config)
    learner = Learner(copy.deepcopy(model), x_ref, config, reference_targets=y_ref)
    intake = Intake(learner.task, lambda: storage.log, lambda: storage.predictions, preprocess=None, wait_s=5.0)
    name, severity = shift
    x_now_pool = corrupt(x_pool, name, severity, seed=seed) if name else x_pool
    t0 = time.time()
    old_ids: list[str] = []
    requests, old_idx = _requests(x_pool, sizes["old"], seed)
    for i, xb in enumerate(requests):  # a week ago, spread over an hour
        served, confidence = serving.task.served(serving.predict(xb))
        old_ids += record.add(xb, served, confidence, now=t0 - WEEK + 3600.0 * i / len(requests))
    requests, _ = _requests(x_now_pool, sizes["total"] - sizes["old"], seed + 1)
    for xb in requests:
        record.add(xb, *serving.task.served(serving.predict(xb)))
    serving.drain()
    record.flush()
    probe = corrupt(x_pool, name, severity, seed=seed + 2) if name else x_pool
    before = _accuracy(serving, probe, y_pool)
    gen = torch.Generator().manual_seed(seed + 3)
    pick = torch.randperm(len(old_ids), generator=gen)[:sizes["labels"]].tolist()
    accepted = refused = 0
    for i in range(0, len(pick), REQUEST):
        chunk = pick[i:i + REQUEST]
        body = {"feedback": [{"id": old_ids[j], "label": int(y_pool[old_idx[j]])} for j in chunk]}
        try:
            accepted += intake.submit(body, "bench")["accepted"]
        except Exception as exc:  # an id that does not resolve: counted, the bar says how many
            log.warning("feedback refused: %s", exc)
            refused += len(chunk)
        for rows in storage.log.entries(after=learner.absorbed, batch=config.learn.max_labels_per_update):
            learner.absorb_entries(rows, serving.context(), storage.log,
                                   current=lambda: record.newest(config.learn.past_sample))
            while learner.update_due:
                if learner.update(serving.context()).updated:
                    serving.install(learner.published(serving.version + 1))
                    serving.sync()
    after = _accuracy(serving, probe, y_pool)
    stats = record.stats()
    by_status = storage.log.stats()["by_status"]
    storage.close()
    return {"shift": f"{name} {severity}" if name else "none", "resolved_share": accepted / len(pick),
            "refused": refused, "accuracy_before": round(before, 4), "accuracy_after": round(after, 4),
            "drop_points": round(100 * (before - after), 2), "by_status": by_status,
            "past_domain": learner.counters["past_domain"], "updates": learner.counters["updates"],
            "record_bytes": stats["bytes"], "record_max_bytes": stats["max_bytes"],
            "record_predictions": stats["predictions"], "reaches_back_s": stats["reaches_back_s"]}


# ----------------------------------------------------------------------------- the 224x224 ResNet
def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2 ** 20


def resnet(requests_n: int, work: Path) -> dict:
    """Serve the ResNet-18 through TorchServe with drift and 5% labels; memory and publish size."""
    import requests as http_lib

    from selfheal_bench.images224 import HANDLER, MODEL_FILE, WEIGHTS, answers, jpegs, prepare
    from selfheal_bench.torchserve import TorchServe, build_archive
    from selfheal_serving.header import parse_header

    model = prepare(work)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    (work / "store").mkdir(exist_ok=True)
    build_archive(work, work / "store", name="resnet", handler=str(HANDLER), model_file=MODEL_FILE, weights=WEIGHTS)
    unique = 256
    clean, shifted = jpegs(unique, seed=2, shifted=False), jpegs(unique, seed=2, shifted=True)
    truth = answers(model, clean)
    snapshots = work / "snapshots"
    ts = TorchServe(work / "server", work / "store", models="resnet=resnet.mar",
                    env={"SELFHEAL_SNAPSHOT_DIR": str(snapshots)})
    rss: dict[str, float] = {}
    labels = errors = 0
    t0 = time.time()
    with ts, http_lib.Session() as http:
        t0 = time.time()  # serving from here (TorchServe's start and the .mar's unpacking before)
        url = f"{ts.inference_url}/predictions/resnet"
        headers = {**ts.headers("inference"), "Content-Type": "application/octet-stream"}
        [worker] = ts.worker_pids()
        pending = None
        for i in range(requests_n):
            k = i % unique
            body = (clean if i < requests_n // 2 else shifted)[k]
            r = http.post(url, data=body, headers=headers, timeout=120)
            if r.status_code != 200:
                errors += 1
                continue
            state = parse_header(r.headers["X-Selfheal"])
            if pending is not None:
                labels += ts.feedback("resnet", {"feedback": [pending]}).status_code == 200
            pending = {"id": state["ids"][0], "label": truth[k]} if i % 20 == 0 else None
            if i == max(1, requests_n // 20):
                rss["worker_start_mb"] = _rss_mb(worker)
            if i % 1000 == 0:
                learner_pid = ts.feedback("resnet", method="get").json().get("pid")
                learner_mb = _rss_mb(int(learner_pid)) if learner_pid else float("nan")
                if i:  # the learner's RSS as it goes: the bar reads one moment, at the end
                    rss["learner_max_sampled_mb"] = max(rss.get("learner_max_sampled_mb", 0.0), learner_mb)
                log.info("resnet: %d requests, worker RSS %.0f MB, learner RSS %.0f MB, %.1f req/s", i,
                         _rss_mb(worker), learner_mb, (i + 1) / (time.time() - t0))
        rss["worker_end_mb"] = _rss_mb(worker)
        status = ts.feedback("resnet", method="get").json()
        rss["learner_mb"] = _rss_mb(int(status["pid"]))
    versions = sorted(snapshots.glob("resnet/snapshot-*.pt"))
    published = [p.stat().st_size for p in versions]
    from selfheal_core.storage import FileSnapshotStore
    from selfheal_core.storage.files import FileStatusBoard

    # versions whose detector statistics the worker could not take (fitted along other axes)
    refused = sum(int((r.get("counters") or {}).get("rebase_refused", 0))
                  for r in FileStatusBoard(snapshots / "resnet").read().values() if r.get("role") == "worker")

    store = FileSnapshotStore(snapshots / "resnet", keep=100)
    latest = store.load(store.latest_version())[0] if versions else {"weights": {}}
    weights_bytes = sum(v.numel() * v.element_size() for v in latest["weights"].values())
    mean_publish = float(np.mean(published)) if published else None
    # per version that carries weights: the bytes a worker reads for it against its weights' bytes (a
    # version from before the first accepted update carries none, and would flatter a mean)
    ratios = []
    for path, size in zip(versions, published):
        carried = store.load(int(path.stem.split("-")[1]))[0]["weights"]
        if carried:
            ratios.append(size / sum(v.numel() * v.element_size() for v in carried.values()))
    return {"requests": requests_n, "errors": errors, "labels_accepted": labels, "seconds": round(time.time() - t0, 1),
            "model_bytes": model_bytes, **{k: round(v, 1) for k, v in rss.items()},
            "worker_rss_growth_mb": round(rss["worker_end_mb"] - rss["worker_start_mb"], 1),
            "learner_limit_mb": round(3 * model_bytes / 2 ** 20 + 500, 1),
            "versions": len(published), "publish_bytes_mean": mean_publish,
            "published_weights_bytes": weights_bytes, "published_weight_tensors": len(latest["weights"]),
            "publish_bytes_per_worker_ratio": round(float(np.mean(ratios)), 3) if ratios else None,
            "versions_with_weights": len(ratios),
            "publish_bytes_vs_whole_model": round(mean_publish / model_bytes, 3) if mean_publish else None,
            "worker_rebase_refused": refused,
            "learner_status": {k: status.get(k) for k in ("version", "absorbed", "counters", "lag")}}


def main() -> None:
    ap = bench_parser(__doc__, "scale.json")
    ap.add_argument("--resnet-requests", type=int, default=None,
                    help="requests to the 224x224 ResNet (default 20,000; 0 with --tiny: a smoke run is seconds)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    model, x_ref, y_ref = demo_model()
    _, _, x_te, y_te = load_digits_split(seed=0)
    sizes, shifts, shipped = {"total": 200_000, "old": 10_000, "labels": 2_000}, SHIFTS, HealConfig()
    if args.tiny:  # two shifts and the control
        sizes, shifts, shipped = {"total": 1_000, "old": 300, "labels": 64}, SHIFTS[:2] + SHIFTS[-1:], smoke()
    rows = []
    for label, config in (("selfheal", shipped),
                          ("past judgement off (past_alpha 0)", replace(shipped, learn=replace(
                              shipped.learn, past_alpha=0.0)))):
        for k, shift in enumerate(shifts):
            with tempfile.TemporaryDirectory(prefix="bench_scale-") as work:
                row = {"method": label, **delayed(model, x_ref, y_ref, x_te, y_te, shift, config, sizes, Path(work),
                                                  seed=10 + k)}
            log.info("%-36s %-10s resolved %.3f  accuracy %.4f -> %.4f (%+.2f points)  past %d  updates %d  "
                     "record %.1f MB of %.0f MB", label, row["shift"], row["resolved_share"], row["accuracy_before"],
                     row["accuracy_after"], -row["drop_points"], row["past_domain"], row["updates"],
                     row["record_bytes"] / 2 ** 20, row["record_max_bytes"] / 2 ** 20)
            rows.append(row)
    ours = [r for r in rows if r["method"] == "selfheal"]
    shifted = [r for r in ours if r["shift"] != "none"]
    scale = {"delayed_resolved_share": min(r["resolved_share"] for r in ours),
             "delayed_current_accuracy_drop_points": max(r["drop_points"] for r in shifted),
             "delayed_record_within_budget": all(r["record_bytes"] <= r["record_max_bytes"] for r in ours),
             "delayed_control_learned_share": next(r for r in ours if r["shift"] == "none")["by_status"].get(
                 "learned", 0) / sizes["labels"]}
    bars = [Bar("delayed_resolved_share", scale["delayed_resolved_share"], ">=", 1.0),
            Bar("delayed_current_accuracy_drop_points", scale["delayed_current_accuracy_drop_points"], "<=", 0.5),
            Bar("delayed_record_within_budget", scale["delayed_record_within_budget"], "==", True)]
    n_resnet = args.resnet_requests if args.resnet_requests is not None else (0 if args.tiny else 20_000)
    served = None
    if n_resnet:
        with tempfile.TemporaryDirectory(prefix="bench_scale-resnet-") as work:
            served = resnet(n_resnet, Path(work))
        log.info("resnet: %s", served)
        scale.update(worker_rss_growth_mb=served["worker_rss_growth_mb"], learner_rss_mb=served["learner_mb"],
                     publish_bytes_per_worker_ratio=served["publish_bytes_per_worker_ratio"])
        bars += [Bar("worker_rss_growth_mb", served["worker_rss_growth_mb"], "<=", 100.0),
                 Bar("learner_rss_mb", served["learner_mb"], "<=", served["learner_limit_mb"]),
                 Bar("publish_bytes_per_worker_ratio", served["publish_bytes_per_worker_ratio"], "<=", 1.1)]
    write_report(args.out, bars, started, keyed=True, tiny=args.tiny, sizes=sizes, scale=scale, rows=rows,
                 resnet=served)


if __name__ == "__main__":
    main()
