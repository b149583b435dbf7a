"""Benchmarks run end to end on a tiny case (their numbers are not checked: benchmarks are not tests).

The ones that start no server run in the test's own process (`run_here`), as `python scripts/<x>`
would run them; those that start servers run as a command (tests/bench/test_bench_servers.py).
"""
from __future__ import annotations

import json
import logging
import random
import runpy
import sys

import numpy as np
import pytest
import torch

from selfheal_bench.torchserve import REPO


def run_here(script: str, *args: str) -> None:
    """`python scripts/<script> <args>` in this process: the script's own `__main__`, without a new
    interpreter importing torch, selfheal and the benchmark's libraries again or simulating
    thresholds this process already has (3-10 CPU-s a benchmark). What a script sets for its
    process (logger levels, threads, the global random generators) is put back afterwards."""
    loggers = [logging.getLogger(name) for name in ("selfheal_core", "selfheal_bench")]
    levels, threads = [lg.level for lg in loggers], torch.get_num_threads()
    rngs = torch.get_rng_state(), random.getstate(), np.random.get_state()
    argv, sys.argv = sys.argv, [str(REPO / "scripts" / script), *args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            pytest.fail(f"{script} {' '.join(args)} exited with {exc.code}")
    finally:
        sys.argv = argv
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        torch.set_num_threads(threads)
        torch.set_rng_state(rngs[0])
        random.setstate(rngs[1])
        np.random.set_state(rngs[2])


def tiny_here(script: str, out, *extra: str) -> dict:
    """`run_here(script, "--tiny", "--out", out, *extra)`; the JSON it wrote."""
    run_here(script, "--tiny", "--out", str(out), *extra)
    return json.loads(out.read_text())


def test_bench_monitor_tiny(tmp_path):
    result = tiny_here("bench_monitor.py", tmp_path / "monitor.json")
    detectors = {(r["stream"], r["detector"]) for r in result["rows"]}
    for name in ("confidence", "feature_shift", "class_shift", "monitor", "river ADWIN", "river PageHinkley"):
        assert ("digits", name) in detectors
    assert ("error_rate", "error_rate") in detectors and ("gauss64", "feature_shift") in detectors
    kinds = {r["kind"] for r in result["rows"] if r["detector"] == "monitor"}
    assert kinds == {"abrupt", "gradual", "label_shift"}
    assert any(k.startswith("calibration") for k in result["bars"])


def test_cuda_check_runs_on_cpu(capsys):
    """The accelerator smoke check (scripts/cuda_check.py) passes on whatever device is here."""
    run_here("cuda_check.py", "--device", "cpu", "--samples", "800")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["same_after_resume"] and result["reset_is_source"] and result["drift"]


def test_bench_feedback_tiny(tmp_path):
    result = tiny_here("bench_feedback.py", tmp_path / "feedback.json")
    methods = {(r["stream"], r["method"]) for r in result["rows"]}
    assert {("rotate", m) for m in ("static", "oracle", "naive", "selfheal")} <= methods
    assert {r["stream"] for r in result["robust"]} == {"clean, labels noise", "clean, labels attack"}
    assert "attack quarantined labels (> 0)" in result["bars"]


def test_bench_heal_tiny(tmp_path):
    result = tiny_here("bench_heal.py", tmp_path / "heal.json", "--batches", "64", "--streams", "clean,continual,correlated")
    methods = {(r["model"], r["stream"], r["method"]) for r in result["rows"]}
    for model in ("cnn_bn", "mlp_ln"):
        for method in ("source", "tent", "eata", "sar", "lame", "roid", "selfheal"):
            assert (model, "correlated", method) in methods
    for key in ("continual_b64_vs_tent", "correlated_b64_vs_tent", "mlp_continual_vs_source"):
        assert result["bars"][key] is not None


def test_bench_tabular_tiny(tmp_path):
    result = tiny_here("bench_tabular.py", tmp_path / "tabular.json", "--streams", "sea,friedman")
    sea, friedman = result["streams"]["sea"], result["streams"]["friedman"]
    for key in ("selfheal_5pct_after_drift", "best_river_5pct_after_drift", "selfheal_100pct_after_drift",
                "best_river_100pct_after_drift", "selfheal_s_per_1k", "arf_s_per_1k", "rolled_back_share",
                "labelfree_minus_static"):
        assert key in sea
    assert friedman["task"] == "regression" and friedman["arf_5pct_after_drift"] > 0


def test_bench_real_tiny(tmp_path, fashion_mnist):
    """Fashion-MNIST-C end to end: every protocol and method the plan names, bars keyed as issue 27 has them."""
    result = tiny_here("bench_real.py", tmp_path / "real.json")
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
    result = tiny_here("bench_estimate.py", tmp_path / "estimate.json")
    for part in ("real", "housing"):
        assert result[part]["mae_points"] is not None and result[part]["cbpe_mae_points"] is not None
    assert {r["stream"] for r in result["real"]["rows"]} == {"fmnist:clean", "fmnist:gaussian_noise"}
    assert all(w["cbpe"] is not None for r in result["rows"] for w in r["windows"])


def test_bench_scale_tiny(tmp_path):
    """Delayed labels: week-old ids resolve from the record; the keys issue 28 names are written."""
    result = tiny_here("bench_scale.py", tmp_path / "scale.json")
    assert {"delayed_resolved_share", "delayed_current_accuracy_drop_points"} <= set(result["scale"])
    assert {"rotate 4", "contrast 4", "none"} <= {r["shift"] for r in result["rows"]}
    assert all(r["resolved_share"] == 1.0 for r in result["rows"])
