"""`selfheal replay` against a real TorchServe: a tiny stream, feedback by id, its PNG and JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from selfheal_bench.data import corrupt, load_digits_split, resample


def test_replay_cli_writes_png_and_json(start_server, tmp_path):
    _, _, x_te, y_te = load_digits_split(seed=0)
    x, y = resample(x_te, y_te, 48, seed=9)
    x[24:] = corrupt(x[24:], "contrast", 5, seed=9)
    np.savez(tmp_path / "stream.npz", x=x.numpy(), y=y.numpy(), phase=np.array(["clean"] * 24 + ["contrast-5"] * 24))
    with start_server() as server:
        keys = server.ts.keys()
        run = subprocess.run(
            [str(Path(sys.executable).with_name("selfheal")), "replay", str(tmp_path / "stream.npz"),
             "--model", "digits", "--inference-url", server.ts.inference_url,
             "--management-url", server.ts.management_url, f"--inference-key={keys['inference']}",
             f"--management-key={keys['management']}", "--feedback-rate", "0.5", "--window", "12",
             "--out", str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        status = server.settled()
    report = json.loads((tmp_path / "out" / "replay.json").read_text())
    assert report["inputs"] == 48 and len(report["windows"]) == 4
    assert [w["phase"] for w in report["windows"]] == ["clean", "clean", "contrast-5", "contrast-5"]
    assert 0 <= report["accuracy"] <= 1 and report["feedback_sent"] > 0 and report["feedback_refused"] == 0
    assert status["log"]["entries"] == report["feedback_sent"], "every label sent was logged"
    png = (tmp_path / "out" / "replay.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "48 inputs" in run.stdout
