"""One archive on three servers: TorchServe (2 workers), Ray Serve (2 replicas + the learner) and
KServe (2 server processes + the learner), each against the same server without selfheal.

For each server: the digits CNN archived with the shipped model-config, a stream of requests of 8
(clean, then rotated digits) sent one at a time, 5% of the predictions labelled by id one request
late. Reports per server (issue 29's keys):
- `p50_ratio`, `p99_ratio`: selfheal's latency over the plain server's, sequential requests;
- `label_delay_p99_s`: label acknowledged -> weights published (the learner's own measure);
- `drifted_accuracy`: served accuracy on the rotated phase (bar: within 2 points of TorchServe's);
- `version_lag_p99_s`: a version seen published -> every replica answering with it (probes);
- `adapter_lines`: code lines of the server adapter (selfheal_serving and selfheal_core excluded).

Ray and KServe bind every interface: the whole run happens in a network namespace of its own
(`unshare -n`, loopback only), which the script enters itself. Writes bench/results/servers.json.

    python scripts/bench_servers.py            # about 6 minutes on 2 cores
    python scripts/bench_servers.py --tiny     # the tests' run
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch
import yaml

from selfheal_bench.data import corrupt, load_digits_split, resample
from selfheal_bench.harness import smoke_section
from selfheal_bench.torchserve import REPO, TorchServe, build_archive, free_ports
from selfheal_bench.train import save_demo
from selfheal_serving.header import parse_header

log = logging.getLogger("bench_servers")
KEY = "bench-servers-key"
MODEL = "digits"
SERVERS = ("torchserve", "ray", "kserve")
ADAPTERS = {"torchserve": ["selfheal_torchserve/*.py", "plugins/feedback/src/org/selfheal/*.java"],
            "ray": ["selfheal_ray/*.py"], "kserve": ["selfheal_kserve/*.py"]}
ADAPTER_SHARED = {"cli.py", "replay.py"}  # the selfheal command: archive, reference, replay, for every server


def adapter_lines(server: str) -> dict:
    """Non-blank, non-comment lines of the adapter's files."""
    files = sorted(p for pattern in ADAPTERS[server] for p in REPO.glob(pattern) if p.name not in ADAPTER_SHARED)
    total = 0
    for p in files:
        for line in p.read_text().splitlines():
            s = line.strip()
            total += bool(s) and not s.startswith(("#", "//", "*", "/*"))
    return {"lines": total, "files": [str(p.relative_to(REPO)) for p in files]}


# ---------------------------------------------------------------------------- clients
class Client:
    """A server under test as the benchmark drives it."""

    learner_url: str | None = None
    learner_headers: dict = {}

    def predict(self, rows: list) -> requests.Response:
        raise NotImplementedError

    def feedback(self, body: dict) -> requests.Response:
        return requests.post(self.learner_url, json=body, headers=self.learner_headers, timeout=120)

    def learner(self) -> dict:
        return requests.get(self.learner_url, headers=self.learner_headers, timeout=30).json()


class TorchServeClient(Client):
    def __init__(self, ts: TorchServe) -> None:
        self.ts, self.url = ts, f"{ts.inference_url}/predictions/{MODEL}"
        self.headers = ts.headers("inference")
        self.learner_url = f"{ts.management_url}/feedback/{MODEL}"
        self.learner_headers = ts.headers("management")
        self.session = requests.Session()

    def predict(self, rows):
        return self.session.post(self.url, json={"instances": rows}, headers=self.headers, timeout=60)


class RoundRobinClient(Client):
    """KServe's processes behind a round-robin balancer (as a Service would spread requests)."""

    def __init__(self, urls: list[str], learner_url: str | None) -> None:
        self.urls, self.k = urls, 0
        self.sessions = [requests.Session() for _ in urls]
        self.learner_url, self.learner_headers = learner_url, {"Authorization": f"Bearer {KEY}"}

    def predict(self, rows):
        self.k = (self.k + 1) % len(self.urls)
        return self.sessions[self.k].post(self.urls[self.k], json={"instances": rows}, timeout=60)


# ---------------------------------------------------------------------------- one run
def drive(client: Client, stream: dict, selfheal: bool, label_rate: float, lag_rounds: int, replicas: int) -> dict:
    x, y, drifted = stream["x"], stream["y"], stream["drifted"]
    for i in range(20):  # warm-up: first requests pay for lazy initialisation
        client.predict(x[:8].tolist()).raise_for_status()
    g = torch.Generator().manual_seed(1)
    latencies, correct, pending, sent = [], [], None, 0
    for i in range(0, len(y), 8):
        rows = x[i:i + 8].tolist()
        t0 = time.perf_counter()
        r = client.predict(rows)
        latencies.append(time.perf_counter() - t0)
        r.raise_for_status()
        labels = [p["label"] for p in r.json()["predictions"]]
        correct += [(int(a == b), bool(d)) for a, b, d in zip(labels, y[i:i + 8].tolist(), drifted[i:i + 8].tolist())]
        if not selfheal:
            continue
        if pending:  # one request late
            fb = client.feedback({"feedback": pending})
            fb.raise_for_status()
            sent += len(pending)
        ids = parse_header(r.headers["X-Selfheal"])["ids"]
        chosen = torch.rand(len(ids), generator=g) < label_rate
        pending = [{"id": ids[k], "label": int(y[i + k])} for k in range(len(ids)) if chosen[k]]
    lat = np.array(latencies) * 1000
    out = {"requests": len(latencies), "p50_ms": round(float(np.percentile(lat, 50)), 3),
           "p99_ms": round(float(np.percentile(lat, 99)), 3),
           "drifted_accuracy": round(float(np.mean([c for c, d in correct if d])), 4),
           "clean_accuracy": round(float(np.mean([c for c, d in correct if not d])), 4)}
    if selfheal:
        out.update(labels_sent=sent, **version_lags(client, stream, lag_rounds, replicas))
        status = client.learner()
        out["label_delay"] = status.get("label_delay")
        out["learner_version"] = status.get("version")
    return out


def version_lags(client: Client, stream: dict, rounds: int, replicas: int) -> dict:
    """Labels for 8 drifted inputs; once the learner reports a newer version, probes until
    4 x replicas answers in a row carry it: that time, per round."""
    x, y, drifted = stream["x"], stream["y"], stream["drifted"]
    idx = torch.nonzero(drifted).flatten()
    lags, publish_waits = [], []
    for k in range(rounds):
        rows = idx[(k * 8) % len(idx):(k * 8) % len(idx) + 8]
        before = int(client.learner().get("version") or 0)
        r = client.predict(x[rows].tolist())
        ids = parse_header(r.headers["X-Selfheal"])["ids"]
        t_sent = time.monotonic()
        deadline = t_sent + 30
        while True:  # the ids are resolvable once the replica's record is flushed (drain interval)
            fb = client.feedback({"feedback": [{"id": i, "label": int(t)} for i, t in zip(ids, y[rows])]})
            if fb.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        fb.raise_for_status()
        while int(client.learner().get("version") or 0) <= before:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no version after labels (round {k}): {client.learner()}")
            time.sleep(0.02)
        published = time.monotonic()
        newest = int(client.learner()["version"])
        publish_waits.append(published - t_sent)
        streak = 0
        while streak < 4 * replicas:
            v = parse_header(client.predict(x[:1].tolist()).headers["X-Selfheal"])["version"]
            streak = streak + 1 if v >= newest else 0
            if time.monotonic() > published + 30:
                raise TimeoutError(f"replicas not on version {newest} 30 s after it was published")
        lags.append(time.monotonic() - published)
    return {"version_lags_s": [round(v, 3) for v in lags],
            "version_lag_p99_s": round(float(np.percentile(lags, 99)), 3),
            "label_to_version_s": [round(v, 3) for v in publish_waits]}


# ---------------------------------------------------------------------------- servers
def config_file(work: Path, workers: int, smoke: bool) -> Path:
    """The shipped model-config, with `workers` TorchServe workers; `smoke` (--tiny): the thresholds
    a smoke run simulates (harness.SMOKE_MONITOR: the same code paths, 1/100 of the simulation)."""
    config = yaml.safe_load((REPO / "model-config.yaml").read_text())
    config.update(minWorkers=workers, maxWorkers=workers)
    if smoke:
        config["handler"]["heal"] = smoke_section(config["handler"].get("heal"))
    path = work / "model-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_torchserve(work: Path, model_dir: Path, stream: dict, args) -> dict:
    out = {}
    for kind in ("plain", "selfheal"):
        store = work / f"ts-{kind}"
        handler = REPO / "selfheal_bench" / "plain_handler.py" if kind == "plain" else "selfheal_torchserve.handler"
        build_archive(model_dir, store, config_file=config_file(work, 2, args.tiny), handler=str(handler))
        with TorchServe(work / f"ts-{kind}-server", store,
                        env={"SELFHEAL_SNAPSHOT_DIR": str(work / "ts-snapshots")}) as ts:
            ts.wait_ready(180, workers=2)
            client = TorchServeClient(ts)
            if kind == "selfheal":  # the learner takes feedback once its worker started it
                deadline = time.monotonic() + 120
                while requests.get(client.learner_url, headers=client.learner_headers, timeout=10).status_code != 200:
                    if time.monotonic() > deadline:
                        raise TimeoutError("TorchServe's learner did not come up")
                    time.sleep(0.5)
            out[kind] = drive(client, stream, kind == "selfheal", args.label_rate, args.lag_rounds, 2)
    return out


def spawn(cmd: list[str], work: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "SELFHEAL_MANAGEMENT_KEY": KEY, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=work, env=env, stdout=open(work / f"{name}.log", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_http(url: str, proc: subprocess.Popen | None, log_file: Path, timeout: float = 180, **kw) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{log_file.name}: exited {proc.returncode}: {log_file.read_text()[-2000:]}")
        try:
            if requests.get(url, timeout=2, **kw).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not up within {timeout} s: "
                               f"{log_file.read_text()[-2000:] if log_file.exists() else ''}")
        time.sleep(0.3)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_kserve(work: Path, mar: Path, stream: dict, args) -> dict:
    out = {}
    py = sys.executable
    for kind in ("plain", "selfheal"):
        ports = free_ports(5)
        procs, urls = [], []
        try:
            if kind == "selfheal":
                procs.append(spawn([py, "-m", "selfheal_kserve", "learner", "--mar", str(mar), "--host", "127.0.0.1",
                                    "--port", str(ports[4]), "--workdir", str(work / "kserve")], work, "ks-learner"))
            for k in range(2):
                cmd = ([py, "-m", "selfheal_kserve", "serve", "--grpc-port", "0", "--workdir", str(work / "kserve")]
                       if kind == "selfheal" else [py, "-m", "selfheal_bench.plain_servers", "kserve"])
                procs.append(spawn(cmd + ["--mar", str(mar), "--host", "127.0.0.1", "--http-port", str(ports[k])],
                                   work, f"ks-{kind}-{k}"))
                urls.append(f"http://127.0.0.1:{ports[k]}/v1/models/{MODEL}:predict")
            for k in range(2):
                wait_http(f"http://127.0.0.1:{ports[k]}/v2/models/{MODEL}/ready", procs[-2 + k],
                          work / f"ks-{kind}-{k}.log")
            learner_url = None
            if kind == "selfheal":
                learner_url = f"http://127.0.0.1:{ports[4]}/feedback/{MODEL}"
                wait_http(learner_url, procs[0], work / "ks-learner.log", headers={"Authorization": f"Bearer {KEY}"})
            out[kind] = drive(RoundRobinClient(urls, learner_url), stream, kind == "selfheal", args.label_rate,
                              args.lag_rounds, 2)
        finally:
            stop(procs)
    return out


def run_ray(work: Path, mar: Path, stream: dict, args) -> dict:
    import ray
    from ray import serve

    from selfheal_bench.plain_servers import ray_plain_app
    from selfheal_ray.app import deploy

    out = {}
    port = free_ports(1)[0]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        serve.run(ray_plain_app(str(mar)).options(num_replicas=2).bind(), name="plain",
                  route_prefix=f"/predictions/{MODEL}")
        out["plain"] = drive(RoundRobinClient([f"{base}/predictions/{MODEL}"], None), stream, False,
                             args.label_rate, args.lag_rounds, 2)
        serve.delete("plain")
        deploy(str(mar), replicas=2, workdir=str(work / "ray"), key=KEY)
        client = RoundRobinClient([f"{base}/predictions/{MODEL}"], f"{base}/feedback/{MODEL}")
        # a replica's status (GET) needs the management key: without it 401, never up
        wait_http(f"{base}/predictions/{MODEL}", None, work / "ray.log", headers={"Authorization": f"Bearer {KEY}"})
        out["selfheal"] = drive(client, stream, True, args.label_rate, args.lag_rounds, 2)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


# ---------------------------------------------------------------------------- main
def make_stream(n_clean: int, n_drifted: int) -> dict:
    _, _, x_test, y_test = load_digits_split(seed=0)
    xc, yc = resample(x_test, y_test, n_clean, seed=1)
    xd, yd = resample(x_test, y_test, n_drifted, seed=2)
    xd = corrupt(xd, "rotate", 4, seed=3)
    return {"x": torch.cat([xc, xd]), "y": torch.cat([yc, yd]),
            "drifted": torch.cat([torch.zeros(n_clean, dtype=torch.bool), torch.ones(n_drifted, dtype=torch.bool)])}


def summarise(raw: dict) -> dict:
    servers = {}
    ts_acc = raw.get("torchserve", {}).get("selfheal", {}).get("drifted_accuracy")
    for name, runs in raw.items():
        plain, heal = runs["plain"], runs["selfheal"]
        delay = (heal.get("label_delay") or {}).get("p99_s")
        servers[name] = {"p50_ratio": round(heal["p50_ms"] / plain["p50_ms"], 3),
                         "p99_ratio": round(heal["p99_ms"] / plain["p99_ms"], 3),
                         "label_delay_p99_s": delay, "drifted_accuracy": heal["drifted_accuracy"],
                         "drifted_accuracy_plain": plain["drifted_accuracy"],
                         "drifted_accuracy_minus_torchserve_points":
                             None if ts_acc is None else round(100 * (heal["drifted_accuracy"] - ts_acc), 2),
                         "version_lag_p99_s": heal["version_lag_p99_s"],
                         "adapter_lines": adapter_lines(name)["lines"], "adapter_files": adapter_lines(name)["files"]}
    return servers


BARS = {"p50_ratio": ("<=", 1.10), "p99_ratio": ("<=", 1.20), "label_delay_p99_s": ("<=", 5.0),
        "version_lag_p99_s": ("<=", 2.0)}


def bars(servers: dict) -> dict:
    out = {}
    for name, s in servers.items():
        for key, (op, target) in BARS.items():
            v = s[key]
            out[f"{name}.{key}"] = {"value": v, "op": op, "target": target, "ok": v is not None and v <= target}
        d = s["drifted_accuracy_minus_torchserve_points"]
        if name != "torchserve" and d is not None:
            out[f"{name}.drifted_accuracy"] = {"value": d, "op": "abs <=", "target": 2.0, "ok": abs(d) <= 2.0}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--clean", type=int, default=2400, help="clean rows (requests of 8)")
    ap.add_argument("--drifted", type=int, default=4800, help="rotated rows (requests of 8)")
    ap.add_argument("--label-rate", type=float, default=0.05)
    ap.add_argument("--lag-rounds", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="a short stream (the tests)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "servers.json"))
    ap.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.in_netns:  # Ray and KServe bind every interface: keep them on a loopback of their own
        netns = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-r", "-n"]
        cmd = [*netns, "sh", "-c", 'ip link set lo up && exec "$@"', "netns", sys.executable, *sys.argv, "--in-netns"]
        return subprocess.call(cmd, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    if args.tiny:
        args.clean, args.drifted, args.lag_rounds = 80, 160, 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    start = time.monotonic()
    stream = make_stream(args.clean, args.drifted)
    raw = {}
    with tempfile.TemporaryDirectory(prefix="bench-servers-") as tmp:
        work = Path(tmp)
        os.environ["HOME"] = str(work)  # Ray keeps a cluster token under ~/.ray
        model_dir = work / "model"
        save_demo(model_dir)
        mar = build_archive(model_dir, work / "store", config_file=config_file(work, 1, args.tiny))
        for name in args.servers.split(","):
            log.info("server %s", name)
            raw[name] = {"torchserve": run_torchserve, "ray": run_ray, "kserve": run_kserve}[name](
                work, model_dir if name == "torchserve" else mar, stream, args)
    servers = summarise(raw)
    result = {"servers": servers, "bars": bars(servers), "raw": raw,
              "stream": {"clean": args.clean, "drifted": args.drifted, "request_rows": 8, "shift": "rotate 4",
                         "label_rate": args.label_rate, "label_delay_requests": 1},
              "config": "the shipped model-config.yaml (TorchServe: 2 workers)",
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip(),
              "elapsed_s": round(time.monotonic() - start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'server':<11} {'p50 ratio':>9} {'p99 ratio':>9} {'label->weights p99':>18} {'drifted acc':>11} "
          f"{'version lag p99':>15} {'adapter lines':>13}")
    for name, s in servers.items():
        print(f"{name:<11} {s['p50_ratio']:>9.3f} {s['p99_ratio']:>9.3f} {str(s['label_delay_p99_s']):>18} "
              f"{s['drifted_accuracy']:>11.4f} {s['version_lag_p99_s']:>15.3f} {s['adapter_lines']:>13}")
    print(f"written {args.out} ({result['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
