"""A real TorchServe on loopback: own working dir, TMPDIR, ports and process group per server."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import yaml

from selfheal_bench.torchserve import REPO, TorchServe, build_archive


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def archive(demo_model_dir: Path, work: Path, snapshot_interval_s: float, workers: int = 1) -> Path:
    """A model store holding digits.mar built by torch-model-archiver with test settings."""
    config = yaml.safe_load((REPO / "model-config.yaml").read_text())
    config["minWorkers"] = config["maxWorkers"] = workers
    config["handler"]["sync_interval_s"] = 0.5
    # Rarer false alarms (3 label-free detectors at 30,000 samples each) so that a clean
    # stream of a few hundred samples stays quiet.
    config["handler"]["heal"] = {"snapshot_interval_s": snapshot_interval_s,
                                 "monitor": {"expected_run_time": 30_000}}
    config["handler"]["max_instances"] = 64
    (work / "model-config.yaml").write_text(yaml.safe_dump(config))
    store = work / "store"
    build_archive(demo_model_dir, store, config_file=work / "model-config.yaml")
    return store


@pytest.fixture(scope="session")
def model_store(demo_model_dir, tmp_path_factory) -> Path:
    """Snapshots after every state change."""
    return archive(demo_model_dir, tmp_path_factory.mktemp("archive"), 0.0)


@pytest.fixture(scope="session")
def two_worker_store(demo_model_dir, tmp_path_factory) -> Path:
    """Two workers per server, a snapshot at most every second."""
    return archive(demo_model_dir, tmp_path_factory.mktemp("archive_two"), 1.0, workers=2)


@pytest.fixture(scope="session")
def one_second_store(demo_model_dir, tmp_path_factory) -> Path:
    """One worker, a snapshot at most every second (replicas)."""
    return archive(demo_model_dir, tmp_path_factory.mktemp("archive_1s"), 1.0)


@pytest.fixture(scope="session")
def rare_snapshot_store(demo_model_dir, tmp_path_factory) -> Path:
    """One snapshot at the first change, then none for an hour: later labels live only in the log."""
    return archive(demo_model_dir, tmp_path_factory.mktemp("archive_rare"), 3600.0)


class Server:
    """A started TorchServe plus the helpers tests need."""

    def __init__(self, ts: TorchServe, snapshots: Path) -> None:
        self.ts, self.snapshots = ts, snapshots
        self.http = requests.Session()

    def predict(self, body, headers=None, raw: bytes | None = None) -> requests.Response:
        hdrs = {**self.ts.headers("inference"), **(headers or {})}
        url = f"{self.ts.inference_url}/predictions/digits"
        if raw is not None:
            return self.http.post(url, data=raw, headers=hdrs, timeout=30)
        return self.http.post(url, json=body, headers=hdrs, timeout=30)

    def feedback(self, body=None, raw: bytes | None = None, key: str | None = "management") -> requests.Response:
        """POST /feedback/digits on the management port (the endpoint plugin)."""
        return self.ts.feedback("digits", body, raw=raw, key=key)

    def feedback_status(self) -> dict:
        return self._settled(lambda: self._get_feedback_status(), "log")

    def _get_feedback_status(self) -> dict:
        r = self.ts.feedback("digits", method="get")
        r.raise_for_status()
        return r.json()

    @staticmethod
    def _settled(fetch, key: str, timeout: float = 30.0) -> dict:
        """Learning runs in the worker's background thread: wait until it absorbed every logged label."""
        deadline = time.monotonic() + timeout
        while True:
            st = fetch()
            log = st.get(key)
            if not log or log["absorbed"] == log["last_seq"] or time.monotonic() > deadline:
                return st
            time.sleep(0.1)

    def status(self) -> dict:
        return self._settled(self._get_status, "feedback_log")

    def _get_status(self) -> dict:
        r = self.http.get(f"{self.ts.management_url}/models/digits?customized=true",
                          headers=self.ts.headers("management"), timeout=30)
        r.raise_for_status()
        return r.json()[0]["customizedMetadata"]


@pytest.fixture(scope="session")
def start_server(model_store, tmp_path_factory):
    """Factory: `with start_server(snapshots=...) as server:` starts and stops one TorchServe."""

    @contextmanager
    def start(snapshots: Path | None = None, store: Path | None = None, env: dict[str, str] | None = None):
        work = tmp_path_factory.mktemp("server")
        snapshots = snapshots or work / "snapshots"
        ts = TorchServe(work, store or model_store, env={"SELFHEAL_SNAPSHOT_DIR": str(snapshots), **(env or {})})
        ts.start()
        try:
            yield Server(ts, snapshots)
        finally:
            ts.stop()

    return start


@pytest.fixture(scope="module")
def server(start_server):
    with start_server() as s:
        yield s
