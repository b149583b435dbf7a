"""`selfheal replay`: send a recorded stream to a served model and chart what happened.

A stream is an `.npz` (inputs `x`, optional labels `y` and per-sample `phase`
names), a CSV (one row per input, a label column), or a folder of images
(`<label>/<file>`, sent as raw bytes, one per request, as `curl -T` would).
Requests go to `POST /predictions/{model}`; a share of the answered ids gets its
label back on `POST /feedback/{model}` a number of requests later, as a
labelling system would. Each response's `X-Selfheal` header gives the version
served, the drift flag and the live accuracy estimate; the replay writes them
with the observed accuracy over time to a PNG and a JSON.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

from selfheal_serving.header import HEADER, parse_header

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass
class Stream:
    """Inputs in sending order: JSON rows (`instances`) or raw bodies (`bodies`), labels if known."""

    instances: list | None = None
    bodies: list[bytes] | None = None
    labels: list | None = None
    phases: list[str] | None = None

    def __len__(self) -> int:
        return len(self.instances if self.instances is not None else self.bodies)


def load_stream(path: Path, label_column: str = "label") -> Stream:
    """An .npz, a .csv or a folder of images as a Stream; ValueError naming what is missing."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it or below it")
        labels = [_label(p.parent.name) for p in files] if all(p.parent != path for p in files) else None
        return Stream(bodies=[p.read_bytes() for p in files], labels=labels)
    if path.suffix == ".npz":
        data = np.load(path, allow_pickle=False)
        key = next((k for k in ("x", "inputs", "instances") if k in data), None)
        if key is None:
            raise ValueError(f"{path}: needs an array named x (inputs); it has {sorted(data.files)}")
        labels = next((data[k].tolist() for k in ("y", "labels", "targets") if k in data), None)
        phases = [str(p) for p in data["phase"].tolist()] if "phase" in data else None
        return Stream(instances=data[key].tolist(), labels=labels, phases=phases)
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise ValueError(f"{path}: no rows")
        columns = [c for c in rows[0] if c not in (label_column, "phase")]
        labels = [_label(r[label_column]) for r in rows] if label_column in rows[0] else None
        phases = [r["phase"] for r in rows] if "phase" in rows[0] else None
        return Stream(instances=[[float(r[c]) for c in columns] for r in rows], labels=labels, phases=phases)
    raise ValueError(f"{path}: give an .npz, a .csv or a folder of images")


def _label(text: str):
    value = float(text)
    return int(value) if value.is_integer() else value


def _served(item):
    """The served label (or value) in one prediction as JSON handlers answer it."""
    if isinstance(item, dict):
        for key in ("label", "prediction", "value", "class"):
            if key in item:
                return item[key]
        return None
    if isinstance(item, list):
        return int(np.argmax(item)) if item and all(isinstance(v, (int, float)) for v in item) else None
    return item


@dataclass
class ReplayConfig:
    inference_url: str = "http://127.0.0.1:8080"
    management_url: str = "http://127.0.0.1:8081"
    model: str = "digits"
    batch: int = 8  # JSON rows per request (images: one per request)
    feedback_rate: float = 0.0  # share of answered predictions whose label is sent back
    feedback_delay: int = 1  # requests between a prediction and its label
    inference_key: str | None = None
    management_key: str | None = None
    seed: int = 0
    timeout_s: float = 60.0
    progress: bool = True


@dataclass
class Trace:
    """Per input: what was served, and the header's version, drift and estimate at that moment."""

    served: list = field(default_factory=list)
    version: list[int] = field(default_factory=list)
    drift: list[bool] = field(default_factory=list)
    estimate: list[float | None] = field(default_factory=list)
    feedback_sent: int = 0
    feedback_refused: int = 0


def read_keys(key_file: Path) -> tuple[str | None, str | None]:
    """(inference, management) keys from TorchServe's key_file.json."""
    data = json.loads(Path(key_file).read_text())
    return data.get("inference", {}).get("key"), data.get("management", {}).get("key")


def replay(stream: Stream, cfg: ReplayConfig) -> Trace:
    """Send the stream; feed labels back for a random share of the answered ids."""
    rng = np.random.default_rng(cfg.seed)
    auth = lambda key: {"Authorization": f"Bearer {key}"} if key else {}  # noqa: E731
    url = f"{cfg.inference_url}/predictions/{cfg.model}"
    feedback_url = f"{cfg.management_url}/feedback/{cfg.model}"
    step = 1 if stream.bodies is not None else max(1, cfg.batch)
    trace, pending = Trace(), deque()
    bar = _progress(len(stream), cfg.progress)
    with requests.Session() as http:
        for start in range(0, len(stream), step):
            if stream.bodies is not None:
                r = http.post(url, data=stream.bodies[start], headers=auth(cfg.inference_key), timeout=cfg.timeout_s)
            else:
                r = http.post(url, json={"instances": stream.instances[start:start + step]},
                              headers=auth(cfg.inference_key), timeout=cfg.timeout_s)
            if not r.ok:
                raise RuntimeError(f"POST {url}: {r.status_code} {r.text[:300]}")
            body = r.json()
            items = body.get("predictions", [body]) if isinstance(body, dict) else (body if step > 1 else [body])
            state = parse_header(r.headers[HEADER]) if HEADER in r.headers else \
                {"version": 0, "drift": False, "accuracy": None, "ids": []}
            n = min(step, len(stream) - start)
            trace.served += [_served(i) for i in items[:n]]
            trace.version += [state["version"]] * n
            trace.drift += [state["drift"]] * n
            trace.estimate += [state["accuracy"]] * n
            if stream.labels is not None and cfg.feedback_rate > 0:
                chosen = rng.random(len(state["ids"])) < cfg.feedback_rate
                pending.append([{"id": pid, "label": stream.labels[start + j]}
                                for j, pid in enumerate(state["ids"]) if chosen[j]])
                while len(pending) > cfg.feedback_delay:
                    _send(http, feedback_url, pending.popleft(), auth(cfg.management_key), cfg, trace)
            bar(n)
        while pending:
            _send(http, feedback_url, pending.popleft(), auth(cfg.management_key), cfg, trace)
    bar(0, done=True)
    return trace


def _send(http, url: str, rows: list[dict], headers: dict, cfg: ReplayConfig, trace: Trace) -> None:
    if not rows:
        return
    r = http.post(url, json={"feedback": rows}, headers=headers, timeout=cfg.timeout_s)
    if r.ok:
        trace.feedback_sent += len(rows)
    else:
        trace.feedback_refused += len(rows)
        log.warning("feedback refused: %s %s", r.status_code, r.text[:200])


def _progress(total: int, enabled: bool):
    """A tqdm bar when tqdm is installed, asked for and stderr is a terminal; a no-op otherwise."""
    bar = None
    if enabled:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="input", file=sys.stderr, disable=None)  # None: off when not a terminal
        except ImportError:
            pass

    def update(n: int, done: bool = False) -> None:
        if bar is not None:
            bar.update(n)
            if done:
                bar.close()

    return update


def summarize(stream: Stream, trace: Trace, window: int) -> dict:
    """Windows of `window` inputs: observed accuracy (where labels are known), mean estimate,
    drift share, version at the end; plus totals."""
    rows = []
    correct = None
    if stream.labels is not None:
        correct = [_matches(s, y) for s, y in zip(trace.served, stream.labels)]
    for lo in range(0, len(trace.served), window):
        hi = min(lo + window, len(trace.served))
        est = [e for e in trace.estimate[lo:hi] if e is not None]
        rows.append({"start": lo, "end": hi,
                     "phase": stream.phases[lo] if stream.phases else None,
                     "observed": _mean(correct[lo:hi]) if correct is not None else None,
                     "estimated": _mean(est) if est else None,
                     "drift": _mean(trace.drift[lo:hi]), "version": trace.version[hi - 1]})
    return {"windows": rows, "inputs": len(trace.served), "window": window,
            "accuracy": _mean(correct) if correct is not None else None,
            "final_version": trace.version[-1] if trace.version else 0,
            "feedback_sent": trace.feedback_sent, "feedback_refused": trace.feedback_refused}


def _matches(served, label) -> float:
    if isinstance(label, float) and not float(label).is_integer():  # regression: within 10% counts as right
        return float(served is not None and abs(served - label) <= 0.1 * max(abs(label), 1e-9))
    return float(served == label)


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else math.nan


def plot(summary: dict, path: Path, title: str = "selfheal replay", baseline: list[float] | None = None) -> None:
    """Accuracy (observed, estimated; a baseline if given), drift share and version over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["windows"]
    xs = [(r["start"] + r["end"]) / 2 for r in rows]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    if rows and rows[0]["observed"] is not None:
        ax.plot(xs, [r["observed"] for r in rows], "o-", label="selfheal, observed")
    if any(r["estimated"] is not None for r in rows):
        ax.plot(xs, [r["estimated"] if r["estimated"] is not None else math.nan for r in rows], "s--",
                label="selfheal, estimated without labels")
    if baseline is not None:
        ax.plot(xs, baseline, "o-", color="gray", label="static model")
    _phases(ax, rows)
    ax.set(ylabel=f"accuracy (windows of {summary['window']})", ylim=(0, 1.02), title=title)
    ax.legend(loc="lower left")
    ax2.fill_between(xs, [r["drift"] for r in rows], step="mid", alpha=0.3, color="red", label="drift flagged")
    ax2.set(ylabel="drift share", ylim=(0, 1.05), xlabel="inputs")
    v = ax2.twinx()
    v.step(xs, [r["version"] for r in rows], where="mid", color="black", label="version")
    v.set_ylabel("version")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _phases(ax, rows: list[dict]) -> None:
    start, current = 0, None
    for r in rows + [{"start": rows[-1]["end"] if rows else 0, "phase": object()}]:
        if r["phase"] != current:
            if current is not None:
                ax.axvspan(start, r["start"], alpha=0.08, color="gray" if current == "clean" else "red")
                ax.text((start + r["start"]) / 2, 0.03, str(current), ha="center")
            start, current = r["start"], r["phase"]
