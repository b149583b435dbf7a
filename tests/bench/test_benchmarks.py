"""Benchmarks run end to end on a tiny case (their numbers are not checked: benchmarks are not tests)."""
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


def test_bench_monitor_tiny(tmp_path):
    out = tmp_path / "monitor.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "bench_monitor.py"), "--tiny", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    detectors = {(r["stream"], r["detector"]) for r in result["rows"]}
    for name in ("confidence", "feature_shift", "class_shift", "monitor", "river ADWIN", "river PageHinkley"):
        assert ("digits", name) in detectors
    assert ("error_rate", "error_rate") in detectors and ("gauss64", "feature_shift") in detectors
    kinds = {r["kind"] for r in result["rows"] if r["detector"] == "monitor"}
    assert kinds == {"abrupt", "gradual", "label_shift"}
    assert any(k.startswith("calibration") for k in result["bars"])


def test_cuda_check_runs_on_cpu():
    """The accelerator smoke check (scripts/cuda_check.py) passes on whatever device is here."""
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "cuda_check.py"), "--device", "cpu",
                          "--samples", "800"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["same_after_resume"] and result["reset_is_source"] and result["drift"]


def test_bench_feedback_tiny(tmp_path):
    out = tmp_path / "feedback.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "bench_feedback.py"), "--tiny", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    methods = {(r["stream"], r["method"]) for r in result["rows"]}
    assert {("rotate", m) for m in ("static", "oracle", "naive", "selfheal")} <= methods
    assert {r["stream"] for r in result["robust"]} == {"clean, labels noise", "clean, labels attack"}
    assert "attack quarantined labels (> 0)" in result["bars"]


def test_bench_heal_tiny(tmp_path):
    out = tmp_path / "heal.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "bench_heal.py"), "--tiny", "--batches", "64",
                    "--streams", "clean,continual,correlated", "--out", str(out)],
                   check=True, capture_output=True, timeout=900)
    result = json.loads(out.read_text())
    methods = {(r["model"], r["stream"], r["method"]) for r in result["rows"]}
    for model in ("cnn_bn", "mlp_ln"):
        for method in ("source", "tent", "eata", "sar", "lame", "roid", "selfheal"):
            assert (model, "correlated", method) in methods
    for key in ("continual_b64_vs_tent", "correlated_b64_vs_tent", "mlp_continual_vs_source"):
        assert result["bars"][key] is not None


def test_bench_tabular_tiny(tmp_path):
    out = tmp_path / "tabular.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "bench_tabular.py"), "--tiny", "--streams", "sea,friedman",
                    "--out", str(out)], check=True, capture_output=True, timeout=900)
    result = json.loads(out.read_text())
    sea, friedman = result["streams"]["sea"], result["streams"]["friedman"]
    for key in ("selfheal_5pct_after_drift", "best_river_5pct_after_drift", "selfheal_100pct_after_drift",
                "best_river_100pct_after_drift", "selfheal_s_per_1k", "arf_s_per_1k", "rolled_back_share",
                "labelfree_minus_static"):
        assert key in sea
    assert friedman["task"] == "regression" and friedman["arf_5pct_after_drift"] > 0


def test_bench_real_tiny(tmp_path, fashion_mnist):
    """Fashion-MNIST-C end to end: every protocol and method the plan names, bars keyed as issue 27 has them."""
    result = run_tiny("bench_real.py", tmp_path / "real.json")
    methods = {(r["model"], r["batch"], r["stream"], r["method"]) for r in result["rows"]}
    for method in ("source", "norm_stats", "tent", "eata", "sar", "lame", "roid", "selfheal"):
        assert ("bn", 64, "continual", method) in methods
    assert ("bn", 1, "continual", "selfheal") in methods and ("gn", 64, "continual", "sar") in methods
    domains = next(r for r in result["rows"] if r["stream"] == "continual")["per_domain"]
    assert len(domains) == 15
    for key in ("continual_b64_vs_roid", "correlated_b64_vs_lame", "nobn_continual_vs_source",
                "long_worst_minus_source_points"):
        assert result["bars"][key]["value"] is not None
    assert {"source", "oracle", "selfheal_label_free", "selfheal_5pct", "selfheal_1pct"} <= set(result["labels"])
    for key in ("selfheal_5pct_after_drift", "best_peer_5pct_after_drift", "selfheal_100pct_after_drift",
                "arf_100pct_after_drift"):
        assert 0 <= result["weather"][key] <= 1


def test_bench_estimate_tiny(tmp_path, fashion_mnist):
    """The estimate against the average confidence and NannyML's CBPE: digits, Fashion-MNIST-C, housing."""
    result = run_tiny("bench_estimate.py", tmp_path / "estimate.json")
    for part in ("real", "housing"):
        assert result[part]["mae_points"] is not None and result[part]["cbpe_mae_points"] is not None
    assert {r["stream"] for r in result["real"]["rows"]} == {"fmnist:clean", "fmnist:gaussian_noise"}
    assert all(w["cbpe"] is not None for r in result["rows"] for w in r["windows"])


def test_bench_scale_tiny(tmp_path):
    """Delayed labels: week-old ids resolve from the record; the keys issue 28 names are written."""
    result = run_tiny("bench_scale.py", tmp_path / "scale.json")
    assert {"delayed_resolved_share", "delayed_current_accuracy_drop_points"} <= set(result["scale"])
    assert {"rotate 4", "contrast 4", "none"} <= {r["shift"] for r in result["rows"]}
    assert all(r["resolved_share"] == 1.0 for r in result["rows"])
