"""Handlers initialised from real .mar files (selfheal archive, unpacked as TorchServe does), no server."""
from __future__ import annotations

import importlib.util
import json
import sys
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import ts
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from selfheal_bench.examples import data
from selfheal_torchserve import cli
from selfheal_torchserve.mixin import BACKGROUND_ENV

REPO = Path(__file__).resolve().parent.parent.parent
EXAMPLES = REPO / "selfheal_bench" / "examples"


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The example models, trained once: {name: (directory with weights.pt and reference.pt)}."""
    out = {}
    for name, train in (("images", data.train_images), ("tabular", data.train_tabular), ("rul", data.train_rul)):
        d = tmp_path_factory.mktemp(name)
        model, ref = train()
        torch.save(model.state_dict(), d / "weights.pt")
        key = "targets" if name == "rul" else "labels"
        torch.save({"inputs": ref.x, key: ref.y}, d / "reference.pt")
        if name == "images":
            torch.jit.script(model).save(str(d / "model.pt"))
        out[name] = d
    return out


def archive(tmp_path: Path, name: str, args: list[str], handler_section: dict | None = None) -> Path:
    """`selfheal archive` into tmp_path, then the .mar unpacked as TorchServe unpacks it."""
    config = {"minWorkers": 1, "maxWorkers": 1,
              "handler": {"snapshot_dir": str(tmp_path / "snapshots"), "learner": "off", "max_instances": 16,
                          "heal": {"monitor": {"expected_run_time": 30_000}}, **(handler_section or {})}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    code = cli.main(["archive", "--name", name, "--config", str(tmp_path / "config.yaml"),
                     "--export-path", str(tmp_path / "store"), *args])
    assert code == 0
    model_dir = tmp_path / "unpacked"
    with zipfile.ZipFile(tmp_path / "store" / f"{name}.mar") as z:
        z.extractall(model_dir)
    return model_dir


class Served:
    """An initialised handler and its context; `call` runs one TorchServe batch."""

    def __init__(self, model_dir: Path, name: str) -> None:
        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
        handler_file = model_dir / manifest["model"]["handler"]
        sys.path.insert(0, str(model_dir))  # TorchServe puts the unpacked .mar on the worker's path
        spec = importlib.util.spec_from_file_location(f"handler_{uuid.uuid4().hex}", handler_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        [cls] = [c for c in vars(module).values() if isinstance(c, type) and c.__module__ == module.__name__]
        metrics = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
        metrics.initialize_cache()
        metrics.set_request_ids("unit-test")
        self.ctx = Context(name, str(model_dir), manifest, 8, None, "0.12.0", metrics=metrics,
                           model_yaml_config=config)
        self.handler = cls()
        self.handler.initialize(self.ctx)
        self.model_dir = model_dir

    def call(self, bodies: list, headers: list[dict] | None = None) -> list[tuple[int, object, dict]]:
        """One batch: [(status, body, selfheal response headers)] per request, after a drain."""
        headers = headers or [{} for _ in bodies]
        self.ctx.request_processor = [RequestProcessor(dict(h)) for h in headers]
        rows = [{"body": b} if isinstance(b, (bytes, bytearray)) else {"body": json.dumps(b).encode()}
                for b in bodies]
        out = self.handler.handle(rows, self.ctx)
        self.handler.selfheal.step()  # the runtime's background round, here: no thread of its own races it
        return [(self.ctx.get_response_status(i)[0], o, dict(self.ctx.get_response_headers(i)))
                for i, o in enumerate(out)]

    def close(self) -> None:
        sys.path.remove(str(self.model_dir))
        self.handler.selfheal.close()


@pytest.fixture(scope="session")
def archives(tmp_path_factory):
    """Unpacked .mar files, built once per (name, arguments, settings) for the session."""
    built: dict[str, Path] = {}

    def get(name: str, args: list[str], handler_section: dict | None = None) -> Path:
        key = json.dumps([name, args, handler_section], sort_keys=True)
        if key not in built:
            built[key] = archive(tmp_path_factory.mktemp(name), name, args, handler_section)
        return built[key]

    return get


@pytest.fixture()
def serve(archives, tmp_path, monkeypatch):
    """Factory: serve(name, archive args, handler settings) -> Served, with snapshots in this
    test's own directory; closed after the test."""
    opened: list[Served] = []

    def make(name: str, args: list[str], handler_section: dict | None = None) -> Served:
        monkeypatch.setenv("SELFHEAL_SNAPSHOT_DIR", str(tmp_path / f"snapshots-{len(opened)}"))
        monkeypatch.setenv(BACKGROUND_ENV, "0")
        served = Served(archives(name, args, handler_section), name)
        opened.append(served)
        return served

    yield make
    for s in opened:
        s.close()


def digits_args(trained) -> list[str]:
    return ["--model-file", str(REPO / "selfheal_bench" / "models.py"), "--weights",
            str(trained["images"] / "weights.pt"), "--reference", str(trained["images"] / "reference.pt")]


def tabular_args(trained) -> list[str]:
    return ["--model-file", str(EXAMPLES / "tabular_model.py"), "--weights", str(trained["tabular"] / "weights.pt"),
            "--model-kwargs", json.dumps(data.TABULAR), "--reference", str(trained["tabular"] / "reference.pt")]


def rul_args(trained) -> list[str]:
    return ["--model-file", str(EXAMPLES / "rul_model.py"), "--weights", str(trained["rul"] / "weights.pt"),
            "--reference", str(trained["rul"] / "reference.pt"), "--task", "regression"]


def np_list(x: torch.Tensor) -> list:
    return np.round(x.numpy(), 5).tolist()
