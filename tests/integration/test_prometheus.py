"""A real Prometheus scraping a real TorchServe: selfheal's gauges after a drifting stream, and
every expression of the Grafana dashboard answering with data (so the dashboard cannot rot)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import requests

from selfheal_bench.torchserve import REPO, free_ports
from selfheal_torchserve.metrics import GAUGES
from tests.conftest import wait_until
from tests.integration.test_healing import replay, stream

DASHBOARD = REPO / "deploy" / "grafana" / "selfheal.json"


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    if os.environ.get("SELFHEAL_REQUIRE_PROMETHEUS") == "1":
        pytest.fail("SELFHEAL_REQUIRE_PROMETHEUS=1 but no prometheus binary (apt-get install prometheus)")
    pytest.skip("no prometheus binary (Debian: apt-get install prometheus; .ci/run installs it)")


class Prometheus:
    """One Prometheus on loopback scraping `target` every second, in its own process group."""

    def __init__(self, work: Path, target: str) -> None:
        self.work, self.port = work, free_ports(1)[0]
        work.mkdir(parents=True, exist_ok=True)
        (work / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: torchserve\n    static_configs:\n      - targets: ['{target}']\n")
        self.proc = subprocess.Popen(
            [prometheus_binary(), f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=open(work / "prometheus.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._ready, bool, 60, "Prometheus answers /-/ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {self.proc.returncode}: "
                               + (self.work / "prometheus.log").read_text()[-2000:])
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=5).ok
        except requests.ConnectionError:
            return False

    def query(self, expr: str) -> list[dict]:
        r = requests.get(f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": expr}, timeout=30)
        assert r.ok, f"PromQL {expr!r}: {r.status_code} {r.text[:500]}"
        return r.json()["data"]["result"]

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def dashboard_expressions(model: str) -> list[str]:
    """Every PromQL expression in the dashboard, with its variables as Grafana would fill them."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return [e.replace("$model", model).replace("$__rate_interval", "1m") for e in exprs]


def value(result: list[dict]) -> float:
    assert result, "no series"
    return max(float(r["value"][1]) for r in result)


@pytest.fixture(scope="module")
def scraped(start_server, tmp_path_factory):
    """A TorchServe that served a clean then a drifting stream with some feedback, and a
    Prometheus that scraped it throughout."""
    with start_server() as server:
        prom = Prometheus(tmp_path_factory.mktemp("prometheus"), server.ts.metrics_url.split("//", 1)[1])
        try:
            replay(server, *stream(None, 0, 300, seed=11), feedback_every=4)
            replay(server, *stream("contrast", 5, 400, seed=12), feedback_every=4)
            server.settled()
            yield server, prom
        finally:
            prom.stop()


def test_metrics_port_shows_selfheal_gauges(scraped):
    """TorchServe's own metrics endpoint (text format) carries selfheal's gauges for the model."""
    server, _ = scraped
    text = wait_until(lambda: requests.get(f"{server.ts.metrics_url}/metrics", timeout=30).text,
                      lambda t: 'selfheal_accuracy_observed{' in t, 60, "the gauges reach the metrics port")
    names = set(re.findall(r"^(selfheal_\w+)\{", text, re.M))
    expected = set(GAUGES) - {"selfheal_feedback_refused"}  # refused: only once a request was refused
    assert expected <= names, f"missing on the metrics port: {sorted(expected - names)}"
    assert re.search(r'^selfheal_model_version\{[^}]*ModelName="digits"', text, re.M)


def test_promql_returns_drift_version_and_estimate(scraped):
    server, prom = scraped
    drift = wait_until(lambda: prom.query('selfheal_drift{ModelName="digits"}'), lambda r: r and value(r) == 1,
                       60, "PromQL: the drift flag is 1")
    assert value(drift) == 1
    version = wait_until(lambda: prom.query('max(selfheal_model_version{ModelName="digits"})'),
                         lambda r: r and value(r) >= 1, 60, "PromQL: a healed version is served")
    assert value(version) >= 1
    estimate = prom.query('selfheal_accuracy_estimated{ModelName="digits"}')
    assert 0 < value(estimate) <= 100
    scores = prom.query('selfheal_drift_score{ModelName="digits"}')
    assert {r["metric"]["Detector"] for r in scores} >= {"confidence", "feature_shift"}


def test_every_dashboard_expression_returns_data(scraped):
    _, prom = scraped
    empty = []
    for expr in dashboard_expressions("digits"):
        try:
            wait_until(lambda e=expr: prom.query(e), bool, 30, f"data for {expr}")
        except pytest.fail.Exception:
            empty.append(expr)
    assert not empty, f"dashboard expressions without data: {empty}"
