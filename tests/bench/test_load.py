"""The paced client of the serving benchmark: open loop at a fixed rate, latency from when each
request was due, CPU by process role."""
from __future__ import annotations

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from selfheal_bench.load import cpu_seconds, paced, percentile, role


class Slow(BaseHTTPRequestHandler):
    """Answers each POST; the 50th one after a stall of 0.3 s (as a GC pause or a publish would)."""

    count = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        with Slow.lock:
            Slow.count += 1
            stall = Slow.count == 50
        if stall:
            time.sleep(0.3)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def test_paced_load_keeps_its_rate_and_charges_a_stall_to_the_requests_behind_it():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        seen = []
        res = paced(f"http://127.0.0.1:{server.server_port}/p", [b"{}"], {}, rate=100, seconds=2.0,
                    connections=1, on_response=lambda k, r: seen.append(k))
    finally:
        server.shutdown()
    assert res["requests"] == 200 and res["non_2xx"] == res["failed"] == 0 and sorted(seen) == list(range(200))
    # one connection, a 0.3 s stall: the ~30 requests due meanwhile waited, and their latency says so
    # (a closed-loop client would have sent them late and measured each as fast)
    assert res["p99_ms"] >= 200, res
    assert 60 <= res["rps"] <= 110, res


def test_cpu_is_read_by_role():
    assert role("java -cp ts/frontend org.pytorch.serve.ModelServer") == "frontend"
    assert role("python ts/model_service_worker.py --sock-type unix") == "workers"
    assert role("python -m selfheal_torchserve.learner_service --model-dir d") == "learner"
    assert cpu_seconds(os.getpid())["frontend"] > 0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0 and percentile(list(range(1, 101)), 0.99) == 99
