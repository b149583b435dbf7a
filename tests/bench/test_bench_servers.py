"""Benchmarks that start servers (TorchServe, KServe), end to end on a tiny case; apart from the
in-process ones (test_benchmarks.py) so that `make test`'s two processes (--dist loadfile) run
the two halves side by side. Their numbers are not checked: benchmarks are not tests."""
from __future__ import annotations

import json
import subprocess
import sys

from selfheal_bench.torchserve import REPO


def run_tiny(script: str, out, timeout: int = 600, extra: tuple[str, ...] = ()) -> dict:
    """`scripts/<script> --tiny --out <out>`, failing with its output's tail; the JSON it wrote."""
    run = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--tiny", "--out", str(out), *extra],
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return json.loads(out.read_text())


def test_bench_serve_tiny(tmp_path):
    """The serving benchmark end to end on the CPU: three handlers under wrk, then a short RSS run."""
    result = run_tiny("bench_serve.py", tmp_path / "serve.json", timeout=900)
    assert {r["kind"] for r in result["rows"]} == {"plain", "monitor", "heal"}
    assert all(r["requests"] > 0 and r["non_2xx"] == 0 for r in result["rows"])
    assert all(r["fixed_requests"] > 0 and r["fixed_non_2xx"] == 0 and r["workers_cpu_ms_per_request"] > 0
               and r["frontend_cpu_ms_per_request"] > 0 for r in result["rows"]), "the fixed-load phase"
    [heal] = [r for r in result["rows"] if r["kind"] == "heal"]
    assert heal["fixed_labels"] > 0 and heal["learner_cpu_ms_per_label"] > 0, "labels by id, the learner's CPU"
    assert result["long_run"]["requests"] >= 600 and result["long_run"]["rss_end_mb"] > 0


def test_bench_workers_small(tmp_path):
    """The README's workers benchmark runs (one and two workers learning from the same labels)."""
    out = tmp_path / "workers.json"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_workers.py"), "--samples", "160",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [r["workers"] for r in result["rows"]] == [1, 2]
    assert all(len(r["versions_seen"]) == 1 and r["labels"] > 0 for r in result["rows"])


def test_bench_servers_tiny(tmp_path):
    """The three-server benchmark end to end in its network namespace, on KServe alone (plain, then
    selfheal with its learner): its TorchServe and Ray runs cost a minute more of servers starting,
    and those adapters have tests of their own (tests/integration, tests/ray)."""
    result = run_tiny("bench_servers.py", tmp_path / "servers.json", timeout=600, extra=("--servers", "kserve"))
    [(name, s)] = result["servers"].items()
    assert name == "kserve"
    assert s["p50_ratio"] > 0 and s["p99_ratio"] > 0 and s["adapter_lines"] > 0
    assert s["label_delay_p99_s"] is not None and s["version_lag_p99_s"] >= 0
    assert result["raw"]["kserve"]["selfheal"]["labels_sent"] > 0
    assert result["bars"]["kserve.version_lag_p99_s"]["target"] == 2.0
