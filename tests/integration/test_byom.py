"""Serve your own model: four user-style models, archived with the documented commands, served for real.

(a) images as bytes through a few-line handler over TorchServe's VisionHandler, (b) a tabular MLP
with LayerNorm and constructor arguments, (c) a regression model, (d) TorchScript (monitor-only).
Each: the user's own response shape, drift flagged on a shifted stream and not on a clean one,
feedback by id, and a restart that serves the same version.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfheal_bench.data import corrupt
from selfheal_bench.examples import data
from tests.conftest import wait_until
from tests.integration.conftest import model_config

REPO = Path(__file__).resolve().parent.parent.parent
EXAMPLES = REPO / "selfheal_bench" / "examples"
SELFHEAL = str(Path(sys.executable).with_name("selfheal"))


def run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


MODELS = {  # name: (example, selfheal archive arguments beyond the common ones, task)
    "images": ("images", ["--model-file", str(REPO / "selfheal_bench" / "models.py"), "--weights", "weights.pt",
                          "--handler", str(EXAMPLES / "image_handler.py")], "classification"),
    "tabular": ("tabular", ["--model-file", str(EXAMPLES / "tabular_model.py"), "--weights", "weights.pt",
                            "--model-kwargs", json.dumps(data.TABULAR)], "classification"),
    "rul": ("rul", ["--model-file", str(EXAMPLES / "rul_model.py"), "--weights", "weights.pt",
                    "--model-kwargs", json.dumps(data.RUL), "--task", "regression"], "regression"),
    "scripted": ("torchscript", ["--weights", "model.pt"], "classification"),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """All four .mar files, built with the commands of the README's "Serve your own model"."""
    root = tmp_path_factory.mktemp("byom")
    store = root / "store"
    config = model_config(root / "config", snapshot_interval_s=0.5)
    for name, (example, args, task) in MODELS.items():
        d = root / example
        if not (d / "val.npz").exists():
            run(sys.executable, "-m", "selfheal_bench.examples", example, "--out", str(d))
        model_args = [a if a not in ("weights.pt", "model.pt") else str(d / a) for a in args]
        check = [a for a in model_args if a != "--handler" and not a.endswith("image_handler.py")]
        run(SELFHEAL, "reference", "--inputs", str(d / "val.npz"), "--inputs-key", "x", "--labels",
            str(d / "val.npz"), "--labels-key", "y", "--out", str(d / "reference.pt"), *check)
        run(SELFHEAL, "archive", "--name", name, "--reference", str(d / "reference.pt"), "--config", str(config),
            "--export-path", str(store), *model_args)
    return store


def image_stream(rotate: float, n: int, seed: int):
    blobs, y = data.images(rotate=rotate, n=n, seed=seed)
    return blobs, y


def requests_for(name: str, shifted: bool, n: int, seed: int):
    """(request bodies: raw bytes or JSON, labels/targets, how to read the answer) for a model."""
    if name == "images":
        blobs, y = image_stream(40.0 if shifted else 0.0, n, seed)
        return [("raw", b) for b in blobs], y
    if name == "scripted":  # the images model as TorchScript, fed decoded images as JSON arrays
        blobs, y = image_stream(0.0, n, seed)
        x = torch.stack([data.decode_image(b) for b in blobs])
        if shifted:
            x = corrupt(x, "contrast", 5, seed=seed)
        return [("json", {"instances": x[i:i + 1].tolist()}) for i in range(n)], y
    gen = data.tabular if name == "tabular" else data.rul
    split = gen(n, seed=seed, shift=shifted)
    return [("json", {"instances": split.x[i:i + 1].tolist()}) for i in range(n)], split.y


def send(server, kind_body):
    kind, body = kind_body
    return server.predict(raw=body, headers={"Content-Type": "application/octet-stream"}) if kind == "raw" \
        else server.predict(body)


@pytest.mark.parametrize("name", list(MODELS))
def test_serve_your_own_model(name, store, start_server, tmp_path):
    task = MODELS[name][2]
    snapshots = tmp_path / "snapshots"
    with start_server(snapshots, store, models=f"{name}={name}.mar", model=name) as server:
        # the user's response shape, selfheal's headers
        clean, _ = requests_for(name, False, 240, seed=11)
        answers = [send(server, r) for r in clean]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:3]
        first = answers[0].json()
        if name == "images":
            assert set(first) == {"digit", "confidence"}, first
        elif task == "regression":
            assert isinstance(first["predictions"][0]["value"], float)
        else:
            assert set(first["predictions"][0]) == {"label", "probabilities"}
        assert server.selfheal(answers[-1])["drift"] is False, "a clean stream is not flagged"
        # drift on a shifted stream, feedback by id one request late
        shifted, y = requests_for(name, True, 240, seed=12)
        pending, firing = None, ""
        for i, r in enumerate(shifted):
            answer = send(server, r)
            assert answer.status_code == 200, answer.text
            firing = ",".join(server.selfheal(answer)["detectors"]) or firing
            if pending:
                fb = server.feedback({"feedback": [pending]})
                assert fb.status_code == 200, fb.text
            key, value = ("target", float(y[i][0])) if task == "regression" else ("label", int(y[i]))
            pending = {"id": server.ids(answer)[0], key: value} if i % 4 == 0 else None
        assert firing, "the shifted stream is flagged"
        status = server.settled()
        assert status["log"]["entries"] == 60 and status["absorbed"] == 60
        described = server.status()
        if name == "scripted":
            assert described["mode"] == "monitor" and status["version"] >= 1 and \
                status["counters"]["updates"] == 0, "monitor-only: labels logged and watched, nothing learned"
            assert "error_rate" in described["drift"]["firing"] or "confidence" in described["drift"]["firing"]
        else:
            assert status["counters"]["updates"] > 0
        version = status["version"]
        wait_until(lambda: send(server, clean[0]), lambda a: server.version(a) == version,
                   30, f"the worker serves version {version}")
    with start_server(snapshots, store, models=f"{name}={name}.mar", model=name) as server:
        answer = send(server, clean[0])
        assert answer.status_code == 200 and server.version(answer) == version
        assert wait_until(server.feedback_status, lambda st: st.get("version") is not None, 30,
                          "the learner status")["log"]["entries"] == 60

