"""Serving cost: a plain handler vs the selfheal handler (monitoring only, and healing).

Starts TorchServe itself for each configuration (token auth on, loopback), for two models:
the digits CNN (one digit per JSON request, at 1 and 2 workers and TorchServe batch sizes 1
and 8) and a 224x224 ResNet-18 (one JPEG per request, the README's image handler; 1 worker,
batch 8). Handlers:
- plain: the same model and request shape, nothing else (`selfheal_bench/plain_handler.py`,
  `selfheal_bench/plain_image_handler.py`);
- monitor: the selfheal handler with `heal: false` (monitoring only) and no feedback;
- heal: the selfheal handler, default healing, on a drifting stream (clean, then drifted:
  contrast-5 digits, brightened low-contrast images), with labels at 5% of the request rate;
  the model's learner process learns from them and publishes versions the worker picks up.
Each server is measured twice:
- at saturation: wrk (2 threads, 8 connections) for throughput and its p99; the heal rows post
  labelled inputs to POST /feedback/<model> at 5% of the plain run's rate meanwhile;
- at a fixed offered load below saturation (`--load`, a share of the plain handler's saturated
  throughput at the same workers and batch): an open-loop paced client (request k due at
  t0 + k / rate, latency counted from when it was due), p50/p99, and the CPU seconds of every
  process of the server (Java frontend, workers, learner) per 1,000 requests; the heal rows
  label 5% of the answers by id (X-Selfheal) and report the learner's CPU per label. The default
  share, 0.3, is below the healing handler's own saturation (about half the plain one here): at
  0.5 its queue grew and its p99 measured saturation, not cost.
Ratios are against the plain handler at the same model, workers and batch size, in the same run.
Then one long healing run of the digits CNN (1 worker, batch 8) for worker RSS growth and the
learner's RSS (--tiny: on the batch-1 healing server of the grid, not a server of its own).
Writes bench/results/serve.json and prints a table.

    python scripts/bench_serve.py            # ~30 min
    python scripts/bench_serve.py --tiny     # a smoke test (digits, seconds per config)

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests
import yaml

from selfheal_bench import images224
from selfheal_bench.data import as_numpy_list, corrupt, load_digits_split, resample
from selfheal_bench.harness import bench_parser, smoke_section
from selfheal_bench.load import LabelsById, cpu_seconds, paced
from selfheal_bench.torchserve import REPO, TorchServe, build_archive
from selfheal_bench.train import save_demo
from selfheal_serving.header import parse_header

log = logging.getLogger("bench_serve")

WRK_SCRIPT = """
local bodies = {}
for path in io.lines(os.getenv("SELFHEAL_BODIES")) do
  local f = io.open(path, "rb")
  bodies[#bodies + 1] = f:read("*a")
  f:close()
end
local i = math.random(#bodies)
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("SELFHEAL_CONTENT_TYPE")
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


@dataclass
class Workload:
    """One model as the benchmark serves it: its archives by handler kind, request bodies (clean,
    and the drifting stream the heal rows get), the drifting stream's labels, and the inputs
    the saturation phase posts as labelled feedback."""

    name: str
    stores: dict[tuple[str, int, int], Path]  # (kind, workers, batch) -> model store
    clean: list[bytes]
    drifting: list[bytes]
    truth: list[int]  # label of drifting[k]
    content_type: str
    feedback_x: object  # tensor of drifted inputs, and their labels
    feedback_y: object
    grid: list[tuple[int, int]] = field(default_factory=list)
    feedback_chunk: int = 5  # labelled inputs per POST (a 224x224 image is 1.6 MB of JSON: the body limit is 4 MiB)
    files: dict[str, Path] = field(default_factory=dict)  # body index files for wrk, by "clean"/"drifting"


def write_bodies(directory: Path, bodies: list[bytes]) -> Path:
    """Each body in a file of its own, and an index of their paths (what the wrk script reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, body in enumerate(bodies):
        path = directory / f"{i:05d}"
        path.write_bytes(body)
        paths.append(str(path))
    index = directory / "index"
    index.write_text("\n".join(paths) + "\n")
    return index


def run_wrk(wrk: str, ts: TorchServe, load: Workload, kind: str, seconds: float) -> dict:
    env = {**os.environ, "SELFHEAL_BODIES": str(load.files["drifting" if kind == "heal" else "clean"]),
           "SELFHEAL_TOKEN": ts.keys()["inference"], "SELFHEAL_CONTENT_TYPE": load.content_type}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT)
    try:
        out = subprocess.run([wrk, "-t2", "-c8", f"-d{max(int(seconds), 1)}s", "--latency", "-s", f.name,
                              f"{ts.inference_url}/predictions/{load.name}"],
                             env=env, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return parse_wrk(out)


def rss_mb(ts: TorchServe) -> float:
    return sum(psutil.Process(p).memory_info().rss for p in ts.worker_pids()) / 2**20


def learner_status(ts: TorchServe, model: str) -> dict:
    r = requests.get(f"{ts.management_url}/feedback/{model}", headers=ts.headers("management"), timeout=30)
    return r.json() if r.ok else {}


def settle(ts: TorchServe, model: str, timeout: float = 120.0) -> dict:
    """The learner's status once it absorbed and published every label sent."""
    deadline = time.monotonic() + timeout
    while True:
        st = learner_status(ts, model)
        if st.get("lag") == 0 and not st.get("unpublished"):
            return st
        if time.monotonic() > deadline:
            log.warning("learner not settled after %.0f s: %s", timeout, {k: st.get(k) for k in ("lag", "absorbed")})
            return st
        time.sleep(0.2)


class FeedbackSender(threading.Thread):
    """Posts labelled drifted inputs to /feedback/<model> at a fixed rate of labels per second."""

    def __init__(self, ts: TorchServe, load: Workload, labels_per_s: float) -> None:
        super().__init__(daemon=True)
        self.ts, self.load, self.chunk = ts, load, load.feedback_chunk
        self.period = self.chunk / max(labels_per_s, 1e-6)
        self.stop_event = threading.Event()
        self.sent, self.failed = 0, 0

    def run(self) -> None:
        i = 0
        x, y = self.load.feedback_x, self.load.feedback_y
        with requests.Session() as http:
            while not self.stop_event.wait(self.period):
                j = (i * self.chunk) % (len(y) - self.chunk)
                body = {"instances": as_numpy_list(x[j:j + self.chunk]), "labels": y[j:j + self.chunk].tolist()}
                r = http.post(f"{self.ts.management_url}/feedback/{self.load.name}", json=body,
                              headers=self.ts.headers("management"), timeout=60)
                self.sent += self.chunk if r.ok else 0
                self.failed += not r.ok
                i += 1


def build(name: str, model_dir: Path, work: Path, kind: str, workers: int, batch: int, learner_nice: int,
          smoke: bool = False, **archive) -> Path:
    config = yaml.safe_load((REPO / "model-config.yaml").read_text())
    config.update(minWorkers=workers, maxWorkers=workers, batchSize=batch, maxBatchDelay=5)
    config["handler"]["learner_nice"] = learner_nice
    config["handler"].update(json.loads(os.environ.get("SELFHEAL_BENCH_HANDLER", "{}")))
    if kind == "monitor":
        config["handler"]["heal"] = False
    if smoke:  # a --tiny run's thresholds: the shipped code paths, 1/100 of the simulation (harness.smoke)
        config["handler"]["heal"] = smoke_section(config["handler"].get("heal"))
    store = work / f"store-{name}-{kind}-{workers}-{batch}"
    cfg = store.with_suffix(".yaml")
    store.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump(config))
    plain, handler = archive.pop("plain_handler"), archive.pop("handler")
    build_archive(model_dir, store, name=name, config_file=cfg, handler=str(plain if kind == "plain" else handler),
                  **archive)
    return store


def build_all(grid, kinds, make) -> dict[tuple[str, int, int], Path]:
    """`make(kind, workers, batch)` for every configuration, two at a time: each is a `selfheal
    archive` process (an interpreter, torch, a calibration, the archiver) waiting on its own."""
    configs = [(kind, w, b) for w, b in grid for kind in kinds]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(configs, pool.map(lambda c: make(*c), configs)))


def fixed_load(ts: TorchServe, load: Workload, kind: str, rate: float, seconds: float) -> dict:
    """The paced phase: latency at `rate`, CPU per 1,000 requests by process role, and (heal) the
    learner's CPU per label for 5% of the answers labelled by id."""
    bodies = load.drifting if kind == "heal" else load.clean
    headers = {**ts.headers("inference"), "Content-Type": load.content_type}
    labels = None
    if kind == "heal":
        labels = LabelsById(f"{ts.management_url}/feedback/{load.name}", ts.headers("management"))
        labels.start()

    def label(k: int, resp) -> None:
        if labels is not None and k % 20 == 0:
            ids = parse_header(resp.getheader("X-Selfheal", ""))["ids"]
            labels.labels.put((ids[0], load.truth[k % len(load.truth)]))

    cpu0 = cpu_seconds(ts.proc.pid)
    res = paced(f"{ts.inference_url}/predictions/{load.name}", bodies, headers, rate, seconds, on_response=label)
    cpu1 = cpu_seconds(ts.proc.pid)
    out = {"offered_rps": rate, "fixed_rps": res["rps"], "fixed_p50_ms": res["p50_ms"], "fixed_p99_ms": res["p99_ms"],
           "fixed_non_2xx": res["non_2xx"] + res["failed"], "fixed_requests": res["requests"]}
    for role in cpu0:
        out[f"{role}_cpu_ms_per_request"] = 1e3 * (cpu1[role] - cpu0[role]) / max(res["requests"], 1)
    if labels is not None:
        labels.finish()
        settle(ts, load.name)
        learner = cpu_seconds(ts.proc.pid)["learner"] - cpu0["learner"]
        out.update(fixed_labels=labels.sent, fixed_labels_failed=labels.failed,
                   learner_cpu_ms_per_label=1e3 * learner / max(labels.sent, 1))
    return out


def measure(wrk, work: Path, load: Workload, kind: str, workers: int, batch: int, seconds: float, warmup: float,
            plain_rps: float | None, share: float, tag: str, then=None) -> dict:
    """One server: a saturated wrk run (healing: with feedback at 5% of the plain rate), then the
    fixed-load phase at `share` of the plain throughput; `then(ts, row)`: more on the same server."""
    name = f"{load.name}-{kind}-{workers}-{batch}-{tag}"
    ts = TorchServe(work / f"server-{name}", load.stores[(kind, workers, batch)], models=f"{load.name}={load.name}.mar",
                    env={"SELFHEAL_SNAPSHOT_DIR": str(work / f"snap-{name}")})
    with ts:
        ts.wait_ready(300, workers=workers)
        run_wrk(wrk, ts, load, kind, warmup)
        rss0 = rss_mb(ts)
        sender = None
        if kind == "heal":
            sender = FeedbackSender(ts, load, 0.05 * (plain_rps or 100.0))
            sender.start()
        res = run_wrk(wrk, ts, load, kind, seconds)
        if sender:
            sender.stop_event.set()
            sender.join()
            res.update(feedback_labels=sender.sent, feedback_failed=sender.failed)
            st = settle(ts, load.name)
            delay = st.get("label_delay", {})
            res.update(label_delay_p50_s=delay.get("p50_s"), label_delay_p99_s=delay.get("p99_s"),
                       label_delay_labels=delay.get("labels"), versions=st.get("version"),
                       updates=st.get("counters", {}).get("updates"),
                       learner_rss_mb=psutil.Process(st["pid"]).memory_info().rss / 2**20 if st.get("pid") else None)
        res.update(fixed_load(ts, load, kind, share * (plain_rps or res["rps"]), seconds))
        res.update(model=load.name, kind=kind, workers=workers, batch=batch, rss_start_mb=rss0, rss_end_mb=rss_mb(ts))
        if then is not None:
            then(ts, res)
    return res


def median_row(model: str, kind: str, workers: int, batch: int, runs: list[dict]) -> dict:
    """The median of each number over the rounds, and every round kept."""
    import statistics

    row = {"model": model, "kind": kind, "workers": workers, "batch": batch, "rounds": runs}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if values and len(values) == len(runs):
            row[key] = statistics.median(values)
    return row


def digits_workload(work: Path, grid, kinds, learner_nice: int, smoke: bool = False) -> Workload:
    import torch

    model_dir = work / "digits-model"
    model_dir.mkdir()
    save_demo(model_dir)
    _, _, x_te, y_te = load_digits_split(seed=0)
    xc, yc = resample(x_te, y_te, 1000, seed=1)
    xd, yd = resample(x_te, y_te, 1000, seed=2)
    xd = corrupt(xd, "contrast", 5, seed=2)
    def body(x) -> list[bytes]:
        return [json.dumps({"instances": as_numpy_list(x[i:i + 1])}).encode() for i in range(len(x))]

    stores = build_all(grid, kinds, lambda kind, w, b: build(
        "digits", model_dir, work, kind, w, b, learner_nice, smoke, handler="selfheal_torchserve.handler",
        plain_handler=REPO / "selfheal_bench" / "plain_handler.py"))
    return Workload("digits", stores, body(xc), body(torch.cat([xc, xd])), torch.cat([yc, yd]).tolist(),
                    "application/json", xd, yd, list(grid))


def resnet_workload(work: Path, grid, kinds, learner_nice: int) -> Workload:
    import torch

    model_dir = work / "resnet-model"
    model_dir.mkdir()
    model = images224.prepare(model_dir)
    clean, shifted = images224.jpegs(128, seed=2, shifted=False), images224.jpegs(128, seed=2, shifted=True)
    truth = images224.answers(model, clean)
    stores = build_all(grid, kinds, lambda kind, w, b: build(
        "resnet", model_dir, work, kind, w, b, learner_nice, handler=images224.HANDLER,
        plain_handler=REPO / "selfheal_bench" / "plain_image_handler.py", model_file=images224.MODEL_FILE,
        weights=images224.WEIGHTS))
    feedback_x = torch.stack([images224.decode(b) for b in shifted[:16]])
    return Workload("resnet", stores, clean, clean + shifted, truth + truth, "application/octet-stream",
                    feedback_x, torch.tensor(truth[:16]), list(grid), feedback_chunk=1)


def main() -> None:
    ap = bench_parser(__doc__, "serve.json")
    ap.add_argument("--seconds", type=float, default=10.0, help="each measured run (saturated, fixed load) per "
                                                                "configuration and round (the ResNet: twice this)")
    ap.add_argument("--load", type=float, default=0.3, help="the fixed offered load, as a share of the plain "
                                                            "handler's saturated throughput")
    ap.add_argument("--rss-requests", type=int, default=200_000, help="long healing run for RSS growth (0: skip)")
    ap.add_argument("--grid", default="1x1,1x8,2x8", help="digits: workers x batch configurations, comma-separated")
    ap.add_argument("--resnet-grid", default="1x8", help="the ResNet's configurations ('': not measured)")
    ap.add_argument("--kinds", default="plain,monitor,heal", help="handlers to measure (plain first: the baseline)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per handler, in rotating order (medians)")
    ap.add_argument("--learner-nice", type=int, default=19, help="niceness of the learner process")
    args = ap.parse_args()
    logging.getLogger("selfheal_bench").setLevel(logging.WARNING)
    wrk = ensure_wrk()
    seconds, warmup = (1.0, 1.0) if args.tiny else (args.seconds, 3.0)
    args.rounds = 1 if args.tiny else args.rounds
    rss_requests = min(args.rss_requests, 600) if args.tiny else args.rss_requests
    parse_grid = lambda text: [tuple(int(v) for v in g.split("x")) for g in text.split(",") if g]  # noqa: E731
    grid = parse_grid(args.grid)[:1] if args.tiny else parse_grid(args.grid)
    resnet_grid = [] if args.tiny else parse_grid(args.resnet_grid)
    kinds = args.kinds.split(",")
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench_serve-"))
    try:
        loads = [digits_workload(work, grid, kinds, args.learner_nice, args.tiny)]
        if resnet_grid:
            loads.append(resnet_workload(work, resnet_grid, kinds, args.learner_nice))
        for load in loads:
            load.files = {"clean": write_bodies(work / f"{load.name}-clean", load.clean),
                          "drifting": write_bodies(work / f"{load.name}-drifting", load.drifting)}
        rows, rss = [], None
        for load in loads:
            scale = 1.0 if load.name == "digits" else 2.0  # a ResNet request is ~50x a digit's: longer runs
            for workers, batch in load.grid:
                runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
                plain_rps = None
                for rnd in range(args.rounds):
                    # the order rotates each round: slow drifts of this shared machine hit every handler
                    for kind in kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]:
                        then = None
                        if args.tiny and kind == "heal" and rss_requests and plain_rps:
                            # a smoke run takes the long run on this server instead of starting another
                            def long_run(ts, res, rate=plain_rps):
                                nonlocal rss
                                rss = long_run_on(ts, wrk, load, rss_requests, rate, res["rps"])
                            then = long_run
                        res = measure(wrk, work, load, kind, workers, batch, seconds * scale, warmup, plain_rps,
                                      args.load, tag=f"{rnd}", then=then)
                        runs[kind].append(res)
                        if kind == "plain" and plain_rps is None:
                            plain_rps = res["rps"]
                        log.info("%s %-7s workers %d batch %d round %d: %.0f req/s p99 %.2f ms; at %.0f req/s: "
                                 "p99 %.2f ms, worker CPU %.2f ms/request (non-2xx %d, %d)", load.name, kind,
                                 workers, batch, rnd, res["rps"], res["p99_ms"], res["offered_rps"],
                                 res["fixed_p99_ms"], res["workers_cpu_ms_per_request"], res["non_2xx"],
                                 res["fixed_non_2xx"])
                rows += [median_row(load.name, kind, workers, batch, runs[kind]) for kind in kinds]
        if rss_requests and rss is None:
            rss = long_run(wrk, work, loads[0], rss_requests, rows, args.learner_nice)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, rss, args, time.time() - t0)


def long_run(wrk, work, load: Workload, n_requests, rows, learner_nice: int = 19) -> dict:
    """Healing handler, 1 worker, batch 8 (batch 1 in --tiny), `n_requests` requests with 5% feedback:
    worker RSS at start and end, the learner's RSS."""
    digits = [r for r in rows if r["model"] == load.name]
    batch = 8 if any(r["workers"] == 1 and r["batch"] == 8 for r in digits) else 1
    plain = next(r for r in digits if r["kind"] == "plain" and r["workers"] == 1 and r["batch"] == batch)
    heal = next(r for r in digits if r["kind"] == "heal" and r["workers"] == 1 and r["batch"] == batch)
    ts = TorchServe(work / "server-long", load.stores[("heal", 1, batch)], models=f"{load.name}={load.name}.mar",
                    env={"SELFHEAL_SNAPSHOT_DIR": str(work / "snap-long")})
    with ts:
        ts.wait_ready(120)
        run_wrk(wrk, ts, load, "heal", 3)
        return long_run_on(ts, wrk, load, n_requests, plain["rps"], heal["rps"])


def long_run_on(ts: TorchServe, wrk, load: Workload, n_requests: int, plain_rps: float, heal_rps: float) -> dict:
    """`n_requests` requests with feedback at 5% of the plain rate, on a started healing server."""
    rss0 = rss_mb(ts)
    sender = FeedbackSender(ts, load, 0.05 * plain_rps)
    sender.start()
    done, rps = 0, max(heal_rps, 1.0)
    while done < n_requests:  # wrk runs for a duration: repeat until the request count is reached
        res = run_wrk(wrk, ts, load, "heal", max((n_requests - done) / rps * 1.05, 1.0))
        done, rps = done + res["requests"], max(res["rps"], 1.0)
    sender.stop_event.set()
    sender.join()
    st = settle(ts, load.name)
    out = {"requests": done, "rps": rps, "rss_start_mb": rss0, "rss_end_mb": rss_mb(ts),
           "feedback_labels": sender.sent, "label_delay": st.get("label_delay"),
           "learner_rss_mb": psutil.Process(st["pid"]).memory_info().rss / 2**20 if st.get("pid") else None}
    out["rss_growth_mb"] = out["rss_end_mb"] - out["rss_start_mb"]
    log.info("long run: %d requests, worker RSS %.0f -> %.0f MB", out["requests"], rss0, out["rss_end_mb"])
    return out


def total_cpu(row: dict) -> float:
    """CPU ms per request of the whole server (frontend, workers, learner) at the fixed load."""
    return sum(row[f"{k}_cpu_ms_per_request"] for k in ("frontend", "workers", "learner"))


def report(rows: list[dict], rss: dict | None, args, elapsed: float) -> None:
    plain = {(r["model"], r["workers"], r["batch"]): r for r in rows if r["kind"] == "plain"}
    print(f"\n{'model':<7} {'handler':<8} {'w x b':>5} {'req/s':>7} {'x plain':>7} {'p99 x':>6} | {'offered':>7} "
          f"{'p99 ms':>7} {'p99 x':>6} {'worker CPU ms/req':>17} {'x plain':>7} {'learner ms/label':>16}")
    bars = {}
    for r in rows:
        base = plain[(r["model"], r["workers"], r["batch"])]
        r["rps_ratio"] = r["rps"] / base["rps"]
        r["saturated_p99_ratio"] = r["p99_ms"] / base["p99_ms"]
        r["p99_ratio"] = r["fixed_p99_ms"] / base["fixed_p99_ms"]  # at the fixed load: the bar
        r["cpu_per_request_ratio"] = r["workers_cpu_ms_per_request"] / base["workers_cpu_ms_per_request"]
        r["total_cpu_per_request_ratio"] = total_cpu(r) / total_cpu(base)
        per_label = r.get("learner_cpu_ms_per_label")
        print(f"{r['model']:<7} {r['kind']:<8} {r['workers']:>2}x{r['batch']:<2} {r['rps']:7.0f} {r['rps_ratio']:7.3f} "
              f"{r['saturated_p99_ratio']:6.2f} | {r['offered_rps']:7.0f} {r['fixed_p99_ms']:7.2f} "
              f"{r['p99_ratio']:6.2f} {r['workers_cpu_ms_per_request']:17.2f} {r['cpu_per_request_ratio']:7.3f} "
              f"{per_label if per_label is None else round(per_label, 1)!s:>16}")
        if r["kind"] == "plain":
            continue
        tag = f"{r['model']} {r['kind']} w{r['workers']} b{r['batch']}"
        bars[f"{tag}: p99 at fixed load / plain (<= 1.10)"] = round(r["p99_ratio"], 3)
        if r["kind"] == "monitor":
            target = 1.05 if r["model"] == "resnet" else 1.15
            bars[f"{tag}: worker CPU per request / plain (<= {target})"] = round(r["cpu_per_request_ratio"], 3)
            if (r["workers"], r["batch"]) in ((1, 8), (2, 8)):
                bars[f"{tag}: saturated throughput / plain (>= 0.95)"] = round(r["rps_ratio"], 3)
        else:
            bars[f"{tag}: learner CPU per label, ms (reported)"] = round(per_label or 0, 1)
            bars[f"{tag}: label-to-weights delay p50 / p99, s (p99 <= 5)"] = (
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
    args.out.write_text(json.dumps({"tiny": args.tiny, "elapsed_s": elapsed, "load": args.load, "rows": rows,
                                    "long_run": rss, "bars": bars}, indent=2))
    print(f"\nwrote {args.out} ({elapsed:.0f}s)")


if __name__ == "__main__":
    main()
