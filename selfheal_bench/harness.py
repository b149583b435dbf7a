"""What every benchmark shares: the demo model and its reference, bars that pass or fail, the report.

A benchmark prints a table and writes JSON under bench/results/ with the keys
its issue names; `Bar` is a figure next to its target, and `write_report`
prints every bar (PASS / SHORT) and writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import operator
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from selfheal_core import HealConfig

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
log = logging.getLogger("bench")

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq}


@dataclass(frozen=True)
class Bar:
    """A measured figure against its target: `Bar("probe drop, points", 0.4, "<=", 1.0)`."""

    name: str
    value: Any
    op: str
    target: Any

    @property
    def ok(self) -> bool:
        if self.value is None:
            return False
        return bool(_OPS[self.op](self.value, self.target))

    def line(self) -> str:
        shown = f"{self.value:.4g}" if isinstance(self.value, float) else str(self.value)
        return f"{'PASS ' if self.ok else 'SHORT'} {self.name}: {shown} (target {self.op} {self.target})"


def demo_model(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The demo CNN trained on the digits (train split less 300 held out), and those 300 as the
    labelled reference: (model, reference inputs, reference labels)."""
    from selfheal_bench.train import split_reference, train

    model, _ = train(seed=seed)
    _, _, x_ref, y_ref = split_reference(seed, 300)
    return model.eval(), x_ref, y_ref


SMOKE_MONITOR = {"calibration_paths": 20, "expected_run_time": 1_000}  # a smoke run's calibration (`smoke`)


def smoke(config: HealConfig | None = None) -> HealConfig:
    """`config` (default: the shipped `HealConfig()`) as a --tiny run uses it: the same code paths,
    its drift thresholds simulated from 20 paths of an expected run time of 1,000 samples, 1/100
    of the shipped simulation (0.3-1 CPU-s a reference, most of a smoke run otherwise). A smoke
    run checks that a benchmark runs end to end; its figures mean nothing."""
    config = config if config is not None else HealConfig()
    return replace(config, monitor=replace(config.monitor, **SMOKE_MONITOR))


def smoke_section(heal: dict | bool | None) -> dict:
    """A model-config's `handler.heal` section (a mapping, `false` or absent) with a smoke run's
    calibration (`SMOKE_MONITOR`), for the archives a --tiny run builds."""
    heal = {"adapt": False} if heal is False else dict(heal or {})
    return {**heal, "monitor": {**heal.get("monitor", {}), **SMOKE_MONITOR}}


def bench_parser(doc: str | None, out_name: str) -> argparse.ArgumentParser:
    """A benchmark's command line: --tiny (a smoke run) and --out (default bench/results/<out_name>);
    logging set up as every benchmark logs (selfheal_core's own lines only from warnings up)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("selfheal_core").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a smoke run: seconds to a few minutes, numbers not meaningful")
    ap.add_argument("--out", type=Path, default=RESULTS / out_name)
    return ap


def write_report(path: Path, bars: list[Bar], started: float, keyed: bool = False, **data: Any) -> dict:
    """Print the bars and write {"elapsed_s", "bars": [...], **data} as JSON; returns it. `keyed`:
    bars as {name: {value, op, target, ok}}, for issues that name each bar's key."""
    listed = [dict(asdict(b), ok=b.ok) for b in bars]
    report = {"elapsed_s": round(time.time() - started, 1),
              "bars": {b.pop("name"): b for b in listed} if keyed else listed, **data}
    print("\nbars:")
    for b in bars:
        print(f"  {b.line()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float))
    print(f"\nwrote {path} ({report['elapsed_s']:.0f}s)")
    return report
