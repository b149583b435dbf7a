"""Serving cost: a plain handler vs the selfheal handler (monitoring only, and healing), under wrk.

Starts TorchServe itself for each configuration (token auth on, loopback) and
loads it with wrk (2 threads, 8 connections, one digit per request, as the
issue's baseline), at 1 and 2 workers and TorchServe batch sizes 1 and 8:
- plain: `selfheal_bench/plain_handler.py`, the same model and JSON shape, nothing else;
- monitor: the selfheal handler with `heal: false` (monitoring only) and no feedback;
- heal: the selfheal handler, default healing, on a drifting stream (clean, then
  contrast-5), with 5% of the plain run's request rate posted as labelled
  feedback to POST /feedback/digits on the management port; the model's learner
  process learns from it and publishes versions the worker picks up. Its
  label-to-weights delay (acknowledged -> in a published version) is reported.
Then one long healing run (1 worker, batch 8) for worker RSS growth and the
learner's RSS (--tiny: on the batch-1 healing server of the grid, not a server of its own).
Writes bench/results/serve.json and prints a table; ratios are against the
plain handler at the same workers and batch size, measured in the same run.

    python scripts/bench_serve.py            # ~15 min
    python scripts/bench_serve.py --tiny     # a smoke test (seconds per config)

wrk comes from the Debian package; the script installs it with apt-get when
it runs as root and wrk is missing.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests
import yaml

from selfheal_bench.data import as_numpy_list, corrupt, load_digits_split, resample
from selfheal_bench.torchserve import REPO, TorchServe, build_archive
from selfheal_bench.train import save_demo
from selfheal_bench.harness import bench_parser

log = logging.getLogger("bench_serve")

WRK_SCRIPT = """
local bodies = {}
for line in io.lines(os.getenv("SELFHEAL_BODIES")) do bodies[#bodies + 1] = line end
local i = math.random(#bodies)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("SELFHEAL_TOKEN")
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
"""



def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log.info("installing wrk (Debian package)")
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)
        path = shutil.which("wrk")
    if not path:
        sys.exit("bench_serve needs wrk: apt-get install wrk")
    return path


def parse_wrk(out: str) -> dict:
    def ms(value: str) -> float:
        num, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
        return float(num) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    pct = {int(p): ms(v) for p, v in re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)", out, re.M)}
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": pct[50],
            "p99_ms": pct[99], "requests": int(total.group(1)), "non_2xx": int(errors.group(1)) if errors else 0}


def run_wrk(wrk: str, ts: TorchServe, bodies: Path, seconds: float) -> dict:
    env = {**os.environ, "SELFHEAL_BODIES": str(bodies), "SELFHEAL_TOKEN": ts.keys()["inference"]}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    try:
        out = subprocess.run([wrk, "-t2", "-c8", f"-d{max(int(seconds), 1)}s", "--latency", "-s", f.name,
                              f"{ts.inference_url}/predictions/digits"],
                             env=env, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return parse_wrk(out)


def rss_mb(ts: TorchServe) -> float:
    return sum(psutil.Process(p).memory_info().rss for p in ts.worker_pids()) / 2**20


def learner_status(ts: TorchServe) -> dict:
    r = requests.get(f"{ts.management_url}/feedback/digits", headers=ts.headers("management"), timeout=30)
    return r.json() if r.ok else {}


def settle(ts: TorchServe, timeout: float = 120.0) -> dict:
    """The learner's status once it absorbed and published every label sent."""
    deadline = time.monotonic() + timeout
    while True:
        st = learner_status(ts)
        if st.get("lag") == 0 and not st.get("unpublished"):
            return st
        if time.monotonic() > deadline:
            log.warning("learner not settled after %.0f s: %s", timeout, {k: st.get(k) for k in ("lag", "absorbed")})
            return st
        time.sleep(0.2)


class FeedbackSender(threading.Thread):
    """Posts labelled drifted inputs to /feedback/digits at a fixed rate of labels per second."""

    def __init__(self, ts: TorchServe, x, y, labels_per_s: float, chunk: int = 5) -> None:
        super().__init__(daemon=True)
        self.ts, self.x, self.y, self.chunk = ts, x, y, chunk
        self.period = chunk / max(labels_per_s, 1e-6)
        self.stop_event = threading.Event()
        self.sent, self.failed = 0, 0

    def run(self) -> None:
        i = 0
        with requests.Session() as http:
            while not self.stop_event.wait(self.period):
                j = (i * self.chunk) % (len(self.y) - self.chunk)
                body = {"instances": as_numpy_list(self.x[j:j + self.chunk]), "labels": self.y[j:j + self.chunk].tolist()}
                r = http.post(f"{self.ts.management_url}/feedback/digits", json=body,
                              headers=self.ts.headers("management"), timeout=60)
                self.sent += self.chunk if r.ok else 0
                self.failed += not r.ok
                i += 1


def build(model_dir: Path, work: Path, kind: str, workers: int, batch: int, learner_nice: int = 19) -> Path:
    config = yaml.safe_load((REPO / "model-config.yaml").read_text())
    config.update(minWorkers=workers, maxWorkers=workers, batchSize=batch, maxBatchDelay=5)
    config["handler"]["learner_nice"] = learner_nice
    config["handler"].update(json.loads(os.environ.get("SELFHEAL_BENCH_HANDLER", "{}")))
    if kind == "monitor":
        config["handler"]["heal"] = False
    store = work / f"store-{kind}-{workers}-{batch}"
    cfg = store.with_suffix(".yaml")
    store.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump(config))
    handler = REPO / "selfheal_bench" / "plain_handler.py" if kind == "plain" else "selfheal_torchserve.handler"
    build_archive(model_dir, store, config_file=cfg, handler=str(handler))
    return store


def measure(wrk, work: Path, store: Path, kind: str, workers: int, batch: int, clean: Path, drifting: Path, xd, yd,
            seconds: float, warmup: float, plain_rps: float, tag: str, then=None) -> dict:
    """One server, one measured wrk run (healing: with feedback at 5% of the plain rate);
    `then(ts, row)`: more to measure on the same server before it stops."""
    name = f"{kind}-{workers}-{batch}-{tag}"
    ts = TorchServe(work / f"server-{name}", store, env={"SELFHEAL_SNAPSHOT_DIR": str(work / f"snap-{name}")})
    with ts:
        ts.wait_ready(120, workers=workers)
        bodies = drifting if kind == "heal" else clean
        run_wrk(wrk, ts, bodies, warmup)
        rss0 = rss_mb(ts)
        sender = None
        if kind == "heal":
            sender = FeedbackSender(ts, xd, yd, 0.05 * plain_rps)
            sender.start()
        res = run_wrk(wrk, ts, bodies, seconds)
        if sender:
            sender.stop_event.set()
            sender.join()
            res.update(feedback_labels=sender.sent, feedback_failed=sender.failed)
            st = settle(ts)
            delay = st.get("label_delay", {})
            res.update(label_delay_p50_s=delay.get("p50_s"), label_delay_p99_s=delay.get("p99_s"),
                       label_delay_labels=delay.get("labels"), versions=st.get("version"),
                       updates=st.get("counters", {}).get("updates"),
                       learner_rss_mb=psutil.Process(st["pid"]).memory_info().rss / 2**20 if st.get("pid") else None)
        res.update(kind=kind, workers=workers, batch=batch, rss_start_mb=rss0, rss_end_mb=rss_mb(ts))
        if then is not None:
            then(ts, res)
    return res


def median_row(kind: str, workers: int, batch: int, runs: list[dict]) -> dict:
    """The median of each number over the rounds, and every round kept."""
    import statistics

    row = {"kind": kind, "workers": workers, "batch": batch, "rounds": runs}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if values and len(values) == len(runs):
            row[key] = statistics.median(values)
    return row


def write_bodies(path: Path, x) -> Path:
    path.write_text("\n".join(json.dumps({"instances": as_numpy_list(x[i:i + 1])}) for i in range(len(x))) + "\n")
    return path


def main() -> None:
    ap = bench_parser(__doc__, "serve.json")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured wrk run per configuration and round")
    ap.add_argument("--rss-requests", type=int, default=200_000, help="long healing run for RSS growth (0: skip)")
    ap.add_argument("--grid", default="1x1,1x8,2x8", help="workers x batch configurations, comma-separated")
    ap.add_argument("--kinds", default="plain,monitor,heal", help="handlers to measure (plain first: the baseline)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per handler, in rotating order (medians)")
    ap.add_argument("--learner-nice", type=int, default=19, help="niceness of the learner process")
    args = ap.parse_args()
    logging.getLogger("selfheal_bench").setLevel(logging.WARNING)
    wrk = ensure_wrk()
    seconds, warmup = (1.0, 1.0) if args.tiny else (args.seconds, 3.0)
    args.rounds = 1 if args.tiny else args.rounds
    rss_requests = min(args.rss_requests, 600) if args.tiny else args.rss_requests
    grid = [tuple(int(v) for v in g.split("x")) for g in args.grid.split(",")]
    grid = grid[:1] if args.tiny else grid
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench_serve-"))
    try:
        model_dir = work / "model"
        model_dir.mkdir()
        import torch

        save_demo(model_dir)
        _, _, x_te, y_te = load_digits_split(seed=0)
        xc, _ = resample(x_te, y_te, 1000, seed=1)
        xd, yd = resample(x_te, y_te, 1000, seed=2)
        xd = corrupt(xd, "contrast", 5, seed=2)
        clean = write_bodies(work / "clean.jsonl", xc)
        drifting = write_bodies(work / "drifting.jsonl", torch.cat([xc, xd]))
        rows, rss = [], None
        kinds = args.kinds.split(",")
        for workers, batch in grid:
            stores = {kind: build(model_dir, work, kind, workers, batch, args.learner_nice) for kind in kinds}
            runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
            plain_rps = None
            for rnd in range(args.rounds):
                # the order rotates each round: slow drifts of this shared machine hit every handler
                for kind in kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]:
                    then = None
                    if args.tiny and kind == "heal" and rss_requests and plain_rps:
                        # a smoke run takes the long run on this server instead of starting another
                        def then(ts, res, rate=plain_rps):
                            nonlocal rss
                            rss = long_run_on(ts, wrk, drifting, xd, yd, rss_requests, rate, res["rps"])
                    res = measure(wrk, work, stores[kind], kind, workers, batch, clean, drifting, xd, yd, seconds,
                                  warmup, plain_rps or 100.0, tag=f"{rnd}", then=then)
                    runs[kind].append(res)
                    if kind == "plain" and plain_rps is None:
                        plain_rps = res["rps"]
                    log.info("%-7s workers %d batch %d round %d: %.0f req/s p50 %.2f ms p99 %.2f ms (non-2xx %d)",
                             kind, workers, batch, rnd, res["rps"], res["p50_ms"], res["p99_ms"], res["non_2xx"])
            rows += [median_row(kind, workers, batch, runs[kind]) for kind in kinds]
        if rss_requests and rss is None:
            rss = long_run(wrk, model_dir, work, drifting, xd, yd, rss_requests, rows, args.learner_nice)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, rss, args, time.time() - t0)


def long_run(wrk, model_dir, work, bodies, xd, yd, n_requests, rows, learner_nice: int = 19) -> dict:
    """Healing handler, 1 worker, batch 8 (batch 1 in --tiny), `n_requests` requests with 5% feedback:
    worker RSS at start and end, the learner's RSS."""
    batch = 8 if any(r["workers"] == 1 and r["batch"] == 8 for r in rows) else 1
    plain = next(r for r in rows if r["kind"] == "plain" and r["workers"] == 1 and r["batch"] == batch)
    heal = next(r for r in rows if r["kind"] == "heal" and r["workers"] == 1 and r["batch"] == batch)
    store = build(model_dir, work, "heal", 1, batch, learner_nice)
    ts = TorchServe(work / "server-long", store, env={"SELFHEAL_SNAPSHOT_DIR": str(work / "snap-long")})
    with ts:
        ts.wait_ready(120)
        run_wrk(wrk, ts, bodies, 3)
        return long_run_on(ts, wrk, bodies, xd, yd, n_requests, plain["rps"], heal["rps"])


def long_run_on(ts: TorchServe, wrk, bodies, xd, yd, n_requests: int, plain_rps: float, heal_rps: float) -> dict:
    """`n_requests` requests with feedback at 5% of the plain rate, on a started healing server."""
    rss0 = rss_mb(ts)
    sender = FeedbackSender(ts, xd, yd, 0.05 * plain_rps)
    sender.start()
    done, rps = 0, max(heal_rps, 1.0)
    while done < n_requests:  # wrk runs for a duration: repeat until the request count is reached
        res = run_wrk(wrk, ts, bodies, max((n_requests - done) / rps * 1.05, 1.0))
        done, rps = done + res["requests"], max(res["rps"], 1.0)
    sender.stop_event.set()
    sender.join()
    st = settle(ts)
    out = {"requests": done, "rps": rps, "rss_start_mb": rss0, "rss_end_mb": rss_mb(ts),
           "feedback_labels": sender.sent, "label_delay": st.get("label_delay"),
           "learner_rss_mb": psutil.Process(st["pid"]).memory_info().rss / 2**20 if st.get("pid") else None}
    out["rss_growth_mb"] = out["rss_end_mb"] - out["rss_start_mb"]
    log.info("long run: %d requests, worker RSS %.0f -> %.0f MB", out["requests"], rss0, out["rss_end_mb"])
    return out


def report(rows: list[dict], rss: dict | None, args, elapsed: float) -> None:
    plain = {(r["workers"], r["batch"]): r for r in rows if r["kind"] == "plain"}
    print(f"\n{'handler':<8} {'workers':>7} {'batch':>5} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'x plain':>8} {'p99 x':>6} {'RSS MB start/end':>17}")
    bars = {}
    for r in rows:
        base = plain[(r["workers"], r["batch"])]
        r["rps_ratio"] = r["rps"] / base["rps"]
        r["p99_ratio"] = r["p99_ms"] / base["p99_ms"]
        print(f"{r['kind']:<8} {r['workers']:>7} {r['batch']:>5} {r['rps']:8.0f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} "
              f"{r['rps_ratio']:8.3f} {r['p99_ratio']:6.2f} {r['rss_start_mb']:8.0f}/{r['rss_end_mb']:.0f}")
        if r["kind"] != "plain":
            tag = f"{r['kind']} w{r['workers']} b{r['batch']}"
            bars[f"{tag}: throughput / plain (>= 0.95)"] = round(r["rps_ratio"], 3)
            bars[f"{tag}: p99 / plain (<= 1.10)"] = round(r["p99_ratio"], 3)
        if r["kind"] == "heal":
            bars[f"heal w{r['workers']} b{r['batch']}: label-to-weights delay p50 / p99, s (p99 <= 5)"] = (
                r.get("label_delay_p50_s"), r.get("label_delay_p99_s"))
    if rss:
        print(f"\nlong healing run: {rss['requests']} requests, worker RSS {rss['rss_start_mb']:.0f} -> "
              f"{rss['rss_end_mb']:.0f} MB")
        bars[f"worker RSS growth over {rss['requests']} requests, MB (< 50)"] = round(rss["rss_growth_mb"], 1)
        bars["learner RSS at the end of the long run, MB (reported)"] = round(rss["learner_rss_mb"] or 0, 1)
    print("\nbars:")
    for k, v in bars.items():
        print(f"  {k}: {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tiny": args.tiny, "elapsed_s": elapsed, "rows": rows, "long_run": rss,
                                    "bars": bars}, indent=2))
    print(f"\nwrote {args.out} ({elapsed:.0f}s)")


if __name__ == "__main__":
    main()
