"""A real TorchServe on loopback: own working dir, TMPDIR, ports and process group per server."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import yaml

from selfheal_bench.torchserve import REPO, TorchServe, build_archive
from selfheal_serving.header import parse_header
from tests.conftest import wait_until



def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def model_config(work: Path, snapshot_interval_s: float = 0.0, workers: int = 1, **handler) -> Path:
    """The repo's model-config with test settings: rarer false alarms (3 label-free detectors at
    30,000 samples each) so that a clean stream of a few hundred samples stays quiet."""
    config = yaml.safe_load((REPO / "model-config.yaml").read_text())
    config["minWorkers"] = config["maxWorkers"] = workers
    config["handler"].update({"sync_interval_s": 0.25, "max_instances": 64, **handler})
    config["handler"]["heal"] = {"snapshot_interval_s": snapshot_interval_s, "monitor": {"expected_run_time": 30_000},
                                 **handler.get("heal", {})}
    work.mkdir(parents=True, exist_ok=True)
    (work / "model-config.yaml").write_text(yaml.safe_dump(config))
    return work / "model-config.yaml"


def archive(demo_model_dir: Path, work: Path, snapshot_interval_s: float, workers: int = 1, **handler) -> Path:
    """A model store holding digits.mar built by `selfheal archive` with test settings."""
    store = work / "store"
    build_archive(demo_model_dir, store, config_file=model_config(work, snapshot_interval_s, workers, **handler))
    return store


@pytest.fixture(scope="session")
def model_store(demo_model_dir, tmp_path_factory) -> Path:
    """Publish after every change."""
    return archive(demo_model_dir, tmp_path_factory.mktemp("archive"), 0.0)


@pytest.fixture(scope="session")
def two_worker_store(demo_model_dir, tmp_path_factory) -> Path:
    """Two workers per server, a version at most every second."""
    return archive(demo_model_dir, tmp_path_factory.mktemp("archive_two"), 1.0, workers=2)


@pytest.fixture(scope="session")
def one_second_store(demo_model_dir, tmp_path_factory) -> Path:
    """One worker, a version at most every second (replicas)."""
    return archive(demo_model_dir, tmp_path_factory.mktemp("archive_1s"), 1.0)


class Server:
    """A started TorchServe plus the helpers tests need."""

    def __init__(self, ts: TorchServe, snapshots: Path, model: str = "digits") -> None:
        self.ts, self.snapshots, self.model = ts, snapshots, model
        self.http = requests.Session()

    def predict(self, body=None, headers=None, raw: bytes | None = None) -> requests.Response:
        hdrs = {**self.ts.headers("inference"), **(headers or {})}
        url = f"{self.ts.inference_url}/predictions/{self.model}"
        if raw is not None:
            return self.http.post(url, data=raw, headers=hdrs, timeout=60)
        return self.http.post(url, json=body, headers=hdrs, timeout=60)

    @staticmethod
    def selfheal(response: requests.Response) -> dict:
        """The X-Selfheal header: {"version", "drift", "detectors", "ids"}."""
        return parse_header(response.headers["X-Selfheal"])

    def ids(self, response: requests.Response) -> list[str]:
        return self.selfheal(response)["ids"]

    def version(self, response: requests.Response) -> int:
        return self.selfheal(response)["version"]

    def feedback(self, body=None, raw: bytes | None = None, key: str | None = "management") -> requests.Response:
        """POST /feedback/{model} on the management port (the endpoint plugin)."""
        return self.ts.feedback(self.model, body, raw=raw, key=key)

    def feedback_status(self) -> dict:
        r = self.ts.feedback(self.model, method="get")
        r.raise_for_status()
        return r.json()

    def settled(self, timeout: float = 60.0) -> dict:
        """The learner's status once it absorbed every logged label and published it."""
        return wait_until(self.feedback_status, lambda st: st.get("log") and st["absorbed"] == st["log"]["last_seq"]
                          and (st["log"]["last_seq"] == 0 or st["version"] >= 1) and st.get("lag") == 0
                          and not st.get("unpublished"),
                          timeout, "the learner absorbs and publishes every logged label")

    def status(self) -> dict:
        r = self.http.get(f"{self.ts.management_url}/models/{self.model}?customized=true",
                          headers=self.ts.headers("management"), timeout=60)
        r.raise_for_status()
        return r.json()[0]["customizedMetadata"]

    def serving_version(self, probe: list, timeout: float = 60.0, at_least: int = 1) -> int:
        """Until inference answers from a published version >= at_least; returns it."""
        r = wait_until(lambda: self.predict({"instances": probe}),
                       lambda r: r.ok and self.version(r) >= at_least, timeout,
                       f"inference answers from version >= {at_least}")
        return self.version(r)


@pytest.fixture(scope="session")
def start_server(model_store, tmp_path_factory):
    """Factory: `with start_server(snapshots=...) as server:` starts and stops one TorchServe."""

    @contextmanager
    def start(snapshots: Path | None = None, store: Path | None = None, env: dict[str, str] | None = None,
              models: str = "digits.mar", model: str = "digits"):
        work = tmp_path_factory.mktemp("server")
        snapshots = snapshots or work / "snapshots"
        ts = TorchServe(work, store or model_store, models=models,
                        env={"SELFHEAL_SNAPSHOT_DIR": str(snapshots), **(env or {})})
        ts.start()
        try:
            # the worker waits up to 60 s for its learner; on a busy machine the learner's start took
            # longer, and the first label met 503 "intake not running": wait as a user would
            wait_until(lambda: ts.feedback(model, method="get").status_code, lambda code: code == 200, 180,
                       "the learner's feedback intake answers")
            yield Server(ts, snapshots, model)
        finally:
            ts.stop()

    return start


@pytest.fixture(scope="module")
def server(start_server):
    with start_server() as s:
        yield s
