"""Open-loop load at a fixed rate, and the CPU each process of a TorchServe tree spent meanwhile.

wrk finds a server's saturation; what a deployment pays is measured below it, at a load it
carries: `paced` sends request k at t0 + k / rate whatever became of the earlier ones (open
loop, as wrk2 does) and counts each latency from when the request was due, so a stalled server
is charged for the requests that queued behind the stall (no coordinated omission).
`cpu_seconds` sums user + system CPU by role (frontend, workers, learner) over a server's
process tree, read before and after a run.
"""
from __future__ import annotations

import http.client
import itertools
import math
import queue
import threading
import time
from typing import Callable
from urllib.parse import urlsplit

import psutil

ROLES = ("frontend", "workers", "learner")


def role(cmdline: str) -> str:
    """Which part of a TorchServe deployment a process is, by its command line."""
    if "selfheal_torchserve.learner_service" in cmdline:
        return "learner"
    if "model_service_worker" in cmdline:
        return "workers"
    return "frontend"  # the Java frontend and its launcher


def cpu_seconds(root_pid: int) -> dict[str, float]:
    """User + system CPU seconds so far of every live process under `root_pid` (itself included), by role."""
    out = dict.fromkeys(ROLES, 0.0)
    try:
        root = psutil.Process(root_pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            out[role(" ".join(p.cmdline()))] += t.user + t.system
        except psutil.Error:  # exited while we looked: its CPU is no longer readable
            pass
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def paced(url: str, bodies: list[bytes], headers: dict[str, str], rate: float, seconds: float,
          connections: int = 16, on_response: Callable[[int, http.client.HTTPResponse], None] | None = None) -> dict:
    """POST `bodies` (cycled) to `url` at `rate` requests/s for `seconds`, over up to `connections`
    keep-alive connections. `on_response(k, response)`: called with each 2xx response (headers
    readable) from the thread that got it. Returns requests, achieved rps, p50/p99 ms (from when
    each request was due), non_2xx and failed (connection errors)."""
    parts = urlsplit(url)
    n = max(1, int(rate * seconds))
    counter = itertools.count()
    latencies: list[float] = []
    tallies = {"non_2xx": 0, "failed": 0}
    lock = threading.Lock()
    t0 = time.perf_counter() + 0.05

    def sender() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        try:
            while (k := next(counter)) < n:  # itertools.count hands each k to one thread
                due = t0 + k / rate
                wait = due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                try:
                    conn.request("POST", parts.path, body=bodies[k % len(bodies)], headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
                    with lock:
                        tallies["failed"] += 1
                    continue
                took = time.perf_counter() - due
                with lock:
                    latencies.append(took)
                    tallies["non_2xx"] += not 200 <= resp.status < 300
                if on_response is not None and 200 <= resp.status < 300:
                    on_response(k, resp)
        finally:
            conn.close()

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    ms = [1e3 * v for v in latencies]
    return {"requests": len(ms), "rps": len(ms) / elapsed, "p50_ms": percentile(ms, 0.50),
            "p99_ms": percentile(ms, 0.99), **tallies}


class LabelsById(threading.Thread):
    """Posts labels by prediction id to POST /feedback/<model>, in chunks, as they are queued:
    what a labeller does with the ids of the X-Selfheal header."""

    def __init__(self, url: str, headers: dict[str, str], chunk: int = 5) -> None:
        super().__init__(daemon=True)
        self.url, self.headers, self.chunk = url, headers, chunk
        self.labels: queue.Queue = queue.Queue()
        self.sent = self.failed = 0
        self._finishing = threading.Event()

    def run(self) -> None:
        import requests

        with requests.Session() as http_:
            while not (self._finishing.is_set() and self.labels.empty()):
                batch = []
                try:
                    batch.append(self.labels.get(timeout=0.2))
                    while len(batch) < self.chunk:
                        batch.append(self.labels.get_nowait())
                except queue.Empty:
                    pass
                if not batch:
                    continue
                r = http_.post(self.url, json={"feedback": [{"id": i, "label": y} for i, y in batch]},
                               headers=self.headers, timeout=120)
                if r.ok:
                    self.sent += len(batch)
                else:
                    self.failed += len(batch)

    def finish(self) -> None:
        """Send what is queued, then stop."""
        self._finishing.set()
        self.join()
