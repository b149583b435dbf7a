"""Benchmark of the drift monitor against river's detectors, in one process on the same streams.

Writes bench/results/monitor.json and prints a table: per detector and stream,
false alarms per 10,000 clean samples, mean detection delay in samples (misses
counted as the horizon), detection rate, and cost per sample.

Ours: each selfheal detector at its configured expected run time (ERT), and
the combined label-free monitor (first alarm of confidence, feature shift,
class shift) that the healer uses. Peers: river's ADWIN, PageHinkley (mode
"up") and KSWIN on the univariate signal a user would give them (prediction
entropy for digits, squared Mahalanobis norm for Gaussian inputs), ADWIN per
class for label shift, and DDM / HDDM_A / ADWIN / PageHinkley on error
indicators. Each peer's sensitivity parameter is tuned by bisection so that
its clean false-alarm rate matches ours on the same clean stream.

    python scripts/bench_monitor.py            # full run (several minutes)
    python scripts/bench_monitor.py --tiny     # seconds: a smoke test
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from selfheal_bench.data import CORRUPTIONS, corrupt, load_digits_split
from selfheal_bench.train import split_reference, train
from selfheal_bench.harness import bench_parser
from selfheal_core.config import MonitorConfig
from selfheal_core.model_parts import find_parts
from selfheal_core.task import Task, TaskKind
from selfheal_core.monitor import (ClassShiftDetector, ConfidenceDetector, ErrorRateDetector,
                                   FeatureShiftDetector, Monitor, ReferenceView, normalized_entropy)

log = logging.getLogger("bench_monitor")


@dataclass
class Signals:
    """Per-sample signals of one stream: what each detector consumes."""

    entropy: np.ndarray  # (N,)
    classes: np.ndarray  # (N,) predicted class
    features: np.ndarray  # (N, F)
    probs: np.ndarray  # (N, C)
    onset: int | None = None  # first drifted sample


@dataclass
class Result:
    false_alarms: list = field(default_factory=list)  # per clean stream: alarms
    clean_samples: int = 0
    delays: dict = field(default_factory=dict)  # stream kind -> list of delays
    detected: dict = field(default_factory=dict)  # stream kind -> list of bools
    cost_us: float = math.nan


# ----------------------------------------------------------------------------- data
class DigitsSource:
    """The demo CNN's outputs on the test split, clean and corrupted (computed once)."""

    def __init__(self, seed: int = 0) -> None:
        self.model, _ = train(seed=seed)
        _, _, self.x_ref, _ = split_reference(seed, 300)
        _, _, self.x_te, self.y_te = load_digits_split(seed=seed)
        self.ref = self._outputs(self.x_ref)
        self.clean = self._outputs(self.x_te)
        self._cache: dict = {}

    def _outputs(self, x: torch.Tensor) -> tuple[np.ndarray, ...]:
        feats = {}

        def capture(_module, inputs, _output) -> None:  # returning a value would replace the output
            feats["f"] = inputs[0]

        hook = find_parts(self.model, 10).head.register_forward_hook(capture)
        with torch.no_grad():
            probs = torch.softmax(self.model(x), 1).double()
        hook.remove()
        return (normalized_entropy(probs).numpy(), probs.argmax(1).numpy(), feats["f"].double().numpy(),
                probs.numpy())

    def corrupted(self, name: str, severity: int):
        key = (name, severity)
        if key not in self._cache:
            self._cache[key] = self._outputs(corrupt(self.x_te, name, severity, seed=severity))
        return self._cache[key]

    def stream(self, parts: list[tuple[tuple, np.ndarray]], onset: int | None) -> Signals:
        """Concatenate (outputs, indices) parts into one signal stream."""
        cols = [np.concatenate([out[j][idx] for out, idx in parts]) for j in range(4)]
        return Signals(*cols, onset=onset)


def digits_streams(src: DigitsSource, kind: str, seeds: int, pre: int, post: int, clean_len: int,
                   families: list[str]) -> list[Signals]:
    n = len(src.y_te)
    out = []
    for s in range(seeds):
        rng = np.random.default_rng(1000 + s)
        if kind == "clean":
            out.append(src.stream([(src.clean, rng.integers(0, n, clean_len))], None))
        elif kind == "abrupt":
            fam = families[s % len(families)]
            out.append(src.stream([(src.clean, rng.integers(0, n, pre)),
                                   (src.corrupted(fam, 3), rng.integers(0, n, post))], pre))
        elif kind == "gradual":  # severity 1..5 over the post-onset window
            fam = families[s % len(families)]
            step = post // 5
            parts = [(src.clean, rng.integers(0, n, pre))]
            parts += [(src.corrupted(fam, sev), rng.integers(0, n, step)) for sev in range(1, 6)]
            out.append(src.stream(parts, pre))
        elif kind == "label_shift":
            priors = rng.dirichlet(np.full(10, 0.1))
            w = priors[src.y_te.numpy()]
            out.append(src.stream([(src.clean, rng.integers(0, n, pre)),
                                   (src.clean, rng.choice(n, post, p=w / w.sum()))], pre))
    return out


def gaussian_streams(dim: int, seeds: int, pre: int, post: int, clean_len: int, shift: float):
    """(reference (300, d), clean streams, shifted streams): N(0, I), then a mean shift of norm `shift`."""
    rng = np.random.default_rng(dim)
    ref = rng.standard_normal((300, dim))
    clean = [rng.standard_normal((clean_len, dim)) for _ in range(seeds)]
    drift = []
    for _ in range(seeds):
        direction = rng.standard_normal(dim)
        x = rng.standard_normal((pre + post, dim))
        x[pre:] += shift * direction / np.linalg.norm(direction)
        drift.append(x)
    return ref, clean, drift


def error_streams(seeds: int, pre: int, post: int, clean_len: int, late: float = 0.10, lag: int = 500):
    """Error indicators in arrival order: 5% errors, then 20%; a fraction `late` arrives `lag` later."""
    clean, drift = [], []
    for s in range(seeds):
        rng = np.random.default_rng(2000 + s)
        clean.append((rng.random(clean_len) < 0.05).astype(float))
        p = np.where(np.arange(pre + post) < pre, 0.05, 0.20)
        err = (rng.random(pre + post) < p).astype(float)
        arrival = np.arange(pre + post) + np.where(rng.random(pre + post) < late, lag, 0)
        order = np.argsort(arrival, kind="stable")
        onset = int(np.flatnonzero(order >= pre)[0])  # first post-drift label to arrive
        drift.append((err[order], onset))
    return clean, drift


# ----------------------------------------------------------------------------- running detectors
Runner = Callable[[object, int], list[int]]  # (signal source, batch) -> alarm indices


def run_ours(make: Callable[[], object], feed: Callable[[object, object, slice], bool], signals, batch: int = 32):
    """Alarm indices of a fresh detector over a stream, fed in batches (an alarm counts at the batch's
    end: batch 1 for delays, 32 as served for false alarms)."""
    det, alarms = make(), []
    n = _length(signals)
    for i in range(0, n, batch):
        sl = slice(i, min(i + batch, n))
        if feed(det, signals, sl):
            alarms.append(sl.stop - 1)
    return alarms


def run_river(make: Callable[[], object], values: np.ndarray) -> list[int]:
    det, alarms = make(), []
    for i, v in enumerate(values.tolist()):
        det.update(v)
        if det.drift_detected:
            alarms.append(i)
    return alarms


def run_river_multi(make: Callable[[], object], onehot: np.ndarray) -> list[int]:
    """One river detector per column; an alarm when any fires."""
    dets, alarms = [make() for _ in range(onehot.shape[1])], []
    for i, row in enumerate(onehot.tolist()):
        fired = False
        for d, v in zip(dets, row):
            d.update(v)
            fired |= d.drift_detected
        if fired:
            alarms.append(i)
    return alarms


def _length(signals) -> int:
    return len(signals.entropy) if isinstance(signals, Signals) else len(signals)


def delay_after(alarms: list[int], onset: int, horizon: int) -> tuple[int, bool]:
    """Samples from onset to the first alarm at or after it (horizon when missed)."""
    after = [a for a in alarms if a >= onset]
    if after and after[0] - onset < horizon:
        return after[0] - onset, True
    return horizon, False


def tune(make_param: Callable[[float], Callable[[], object]], runner, clean: list, target: float,
         lo: float, hi: float, log_scale: bool, more_alarms_with_higher: bool, steps: int = 10) -> float:
    """Bisection on a peer's parameter so its clean alarms per 10k match `target`."""
    n = sum(_length(c) for c in clean)

    def rate(p: float) -> float:
        return sum(len(runner(make_param(p), c)) for c in clean) / n * 1e4

    for _ in range(steps):
        mid = math.sqrt(lo * hi) if log_scale else 0.5 * (lo + hi)
        too_many = rate(mid) > target
        if too_many == more_alarms_with_higher:
            hi = mid
        else:
            lo = mid
    return math.sqrt(lo * hi) if log_scale else 0.5 * (lo + hi)


# ----------------------------------------------------------------------------- the benchmark
def main() -> None:
    ap = bench_parser(__doc__, "monitor.json")
    ap.add_argument("--ert", type=int, default=10_000)
    args = ap.parse_args()
    from river import drift
    from river.drift import binary

    tiny = args.tiny
    ert = 500 if tiny else args.ert
    seeds = 2 if tiny else 20
    clean_len = 1_000 if tiny else 50_000
    pre, post = (300, 600) if tiny else (1_000, 2_000)
    horizon = post
    paths = 40 if tiny else 200
    families = sorted(CORRUPTIONS)
    t_start = time.time()

    src = DigitsSource()
    ref = src.ref
    cfg = MonitorConfig(expected_run_time=ert, calibration_paths=paths)

    def make_conf():
        return ConfidenceDetector(ert, cfg.cusum_slack, paths).calibrate(ref[0])

    def make_feat():
        return FeatureShiftDetector(ert, cfg.feature_dims, cfg.ewma_lambda, cfg.calibration_margin,
                                    paths=paths).calibrate(ref[2])

    def make_cls():
        return ClassShiftDetector(ert, cfg.ewma_lambda, cfg.calibration_margin, paths).calibrate(ref[1], 10)

    log.info("calibrating (ERT %d)", ert)
    proto = {"confidence": make_conf(), "feature_shift": make_feat(), "class_shift": make_cls()}
    monitor = Monitor(cfg, Task(TaskKind.CLASSIFICATION, 10)).calibrate(
        ReferenceView(probs=torch.from_numpy(ref[3]), features=torch.from_numpy(ref[2])))

    def fresh(name):
        def make():
            det = proto[name]
            det.reset()
            return det
        return make

    def fresh_monitor():
        monitor.reset()
        return monitor

    ours: dict[str, tuple[Callable, Callable]] = {
        "confidence": (fresh("confidence"), lambda d, s, sl: d.update(s.entropy[sl]).drift_detected),
        "feature_shift": (fresh("feature_shift"), lambda d, s, sl: d.update(s.features[sl]).drift_detected),
        "class_shift": (fresh("class_shift"), lambda d, s, sl: d.update(s.classes[sl]).drift_detected),
        "monitor": (fresh_monitor, lambda d, s, sl: bool(d.observe_predictions(
            torch.from_numpy(s.probs[sl]), torch.from_numpy(s.features[sl])))),
    }
    results: dict[str, dict[str, Result]] = {}  # group -> detector -> result

    # ---- digits streams
    streams = {k: digits_streams(src, k, seeds, pre, post, clean_len, families)
               for k in ("clean", "abrupt", "gradual", "label_shift")}
    group = results.setdefault("digits", {})
    for name, (make, feed) in ours.items():
        r = group.setdefault(name, Result())
        for s in streams["clean"]:
            r.false_alarms.append(len(run_ours(make, feed, s)))
            r.clean_samples += _length(s)
        for kind in ("abrupt", "gradual", "label_shift"):  # one sample at a time: exact delays
            for s in streams[kind]:
                d, ok = delay_after(run_ours(make, feed, s, batch=1), s.onset, horizon)
                r.delays.setdefault(kind, []).append(d)
                r.detected.setdefault(kind, []).append(ok)
        log.info("digits: %s done", name)
    target = _fa(group["monitor"])  # peers match the combined monitor's clean false-alarm rate
    tune_clean = [s.entropy for s in streams["clean"][: (2 if tiny else 6)]]
    peers = {
        "river ADWIN": (lambda p: (lambda: drift.ADWIN(delta=p)), 1e-12, 0.5, True, True),
        "river PageHinkley": (lambda p: (lambda: drift.PageHinkley(threshold=p, mode="up")), 0.05, 200.0, True,
                              False),
        "river KSWIN": (lambda p: (lambda: drift.KSWIN(alpha=p, seed=0)), 1e-12, 0.05, True, True),
    }
    for name, (mk, lo, hi, logscale, higher_more) in peers.items():
        if name == "river KSWIN" and tiny:
            continue
        param = (lo * hi) ** 0.5 if tiny else tune(mk, run_river, tune_clean, target, lo, hi, logscale,
                                                   higher_more)
        r = group.setdefault(name, Result())
        r.param = param  # type: ignore[attr-defined]
        for s in streams["clean"]:
            r.false_alarms.append(len(run_river(mk(param), s.entropy)))
            r.clean_samples += _length(s)
        for kind in ("abrupt", "gradual", "label_shift"):
            for s in streams[kind]:
                d, ok = delay_after(run_river(mk(param), s.entropy), s.onset, horizon)
                r.delays.setdefault(kind, []).append(d)
                r.detected.setdefault(kind, []).append(ok)
        log.info("digits: %s done (param %.3g)", name, param)
    # ADWIN per class on one-hot predictions: a peer fit for label shift.
    onehot = lambda s: np.eye(10)[s.classes]  # noqa: E731
    mk = lambda p: (lambda: drift.ADWIN(delta=p))  # noqa: E731
    param = 1e-4 if tiny else tune(mk, run_river_multi, [onehot(s) for s in streams["clean"][:3]], target,
                                   1e-12, 0.5, True, True, steps=8)
    r = group.setdefault("river ADWIN per class", Result())
    r.param = param  # type: ignore[attr-defined]
    for s in streams["clean"][: (2 if tiny else 5)]:
        r.false_alarms.append(len(run_river_multi(mk(param), onehot(s))))
        r.clean_samples += _length(s)
    for s in streams["label_shift"]:
        d, ok = delay_after(run_river_multi(mk(param), onehot(s)), s.onset, horizon)
        r.delays.setdefault("label_shift", []).append(d)
        r.detected.setdefault("label_shift", []).append(ok)
    log.info("digits: ADWIN per class done (param %.3g)", param)

    # ---- Gaussian mean shift
    for dim in (2, 16, 64):
        gref, gclean, gdrift = gaussian_streams(dim, seeds, pre, post, clean_len // 2, shift=1.0)
        det = FeatureShiftDetector(ert, cfg.feature_dims, cfg.ewma_lambda, cfg.calibration_margin,
                                   paths=paths).calibrate(gref)
        grp = results.setdefault(f"gauss{dim}", {})

        def make_g(det=det):
            det.reset()
            return det

        feed_g = lambda d, x, sl: d.update(x[sl]).drift_detected  # noqa: E731
        r = grp.setdefault("feature_shift", Result())
        for x in gclean:
            r.false_alarms.append(len(run_ours(make_g, feed_g, x)))
            r.clean_samples += len(x)
        for x in gdrift:
            d, ok = delay_after(run_ours(make_g, feed_g, x, batch=1), pre, horizon)
            r.delays.setdefault("mean_shift", []).append(d)
            r.detected.setdefault("mean_shift", []).append(ok)
        mu, prec = gref.mean(0), np.linalg.inv(np.cov(gref, rowvar=False).reshape(dim, dim))
        norm2 = lambda x: np.einsum("nd,de,ne->n", x - mu, prec, x - mu)  # noqa: E731
        tgt = _fa(r)
        for name, (mkp, lo, hi, logscale, higher_more) in peers.items():
            if name == "river KSWIN" and tiny:
                continue
            param = (lo * hi) ** 0.5 if tiny else tune(mkp, run_river, [norm2(x) for x in gclean[:3]],
                                                       max(tgt, 0.05), lo, hi, logscale, higher_more, steps=8)
            rp = grp.setdefault(name, Result())
            rp.param = param  # type: ignore[attr-defined]
            for x in gclean:
                rp.false_alarms.append(len(run_river(mkp(param), norm2(x))))
                rp.clean_samples += len(x)
            for x in gdrift:
                d, ok = delay_after(run_river(mkp(param), norm2(x)), pre, horizon)
                rp.delays.setdefault("mean_shift", []).append(d)
                rp.detected.setdefault("mean_shift", []).append(ok)
        log.info("gauss%d done", dim)

    # ---- error rate 5% -> 20%, 10% of labels 500 late
    eclean, edrift = error_streams(seeds, pre, post, clean_len)
    grp = results.setdefault("error_rate", {})
    make_e = lambda: ErrorRateDetector(ert, cfg.error_rate_shift, cfg.error_rate_floor, paths).calibrate(0.05)  # noqa: E731
    edet = make_e()

    def fresh_e():
        edet.reset()
        return edet

    feed_e = lambda d, x, sl: d.update(x[sl]).drift_detected  # noqa: E731
    r = grp.setdefault("error_rate", Result())
    for x in eclean:
        r.false_alarms.append(len(run_ours(fresh_e, feed_e, x, batch=1)))
        r.clean_samples += len(x)
    for x, onset in edrift:
        d, ok = delay_after(run_ours(fresh_e, feed_e, x, batch=1), onset, horizon)
        r.delays.setdefault("error_rise", []).append(d)
        r.detected.setdefault("error_rise", []).append(ok)
    tgt = _fa(r)
    epeers = {
        "river DDM": (lambda p: (lambda: binary.DDM(drift_threshold=p)), 1.0, 20.0, False, False),
        "river HDDM_A": (lambda p: (lambda: binary.HDDMA(drift_confidence=p)), 1e-12, 0.5, True, True),
        "river ADWIN": peers["river ADWIN"],
        "river PageHinkley": peers["river PageHinkley"],
    }
    for name, (mkp, lo, hi, logscale, higher_more) in epeers.items():
        param = (lo * hi) ** 0.5 if tiny else tune(mkp, run_river, eclean[:4], max(tgt, 0.05), lo, hi, logscale,
                                                   higher_more, steps=10)
        rp = grp.setdefault(name, Result())
        rp.param = param  # type: ignore[attr-defined]
        for x in eclean:
            rp.false_alarms.append(len(run_river(mkp(param), x)))
            rp.clean_samples += len(x)
        for x, onset in edrift:
            d, ok = delay_after(run_river(mkp(param), x), onset, horizon)
            rp.delays.setdefault("error_rise", []).append(d)
            rp.detected.setdefault("error_rise", []).append(ok)
    log.info("error rate done")

    # ---- cost per sample
    cost_stream = streams["clean"][0]
    n_cost = min(_length(cost_stream), 5_000 if tiny else 50_000)
    for name, (make, feed) in ours.items():
        det = make()
        t0 = time.perf_counter()
        for i in range(0, n_cost, 32):
            feed(det, cost_stream, slice(i, min(i + 32, n_cost)))
        results["digits"][name].cost_us = (time.perf_counter() - t0) / n_cost * 1e6
    for name, (mkp, *_rest) in peers.items():
        if name in results["digits"]:
            p = results["digits"][name].param
            vals = cost_stream.entropy[: min(n_cost, 10_000)]
            t0 = time.perf_counter()
            run_river(mkp(p), vals)
            results["digits"][name].cost_us = (time.perf_counter() - t0) / len(vals) * 1e6
    report(results, args, ert, seeds, time.time() - t_start)


def _fa(r: Result) -> float:
    return sum(r.false_alarms) / max(r.clean_samples, 1) * 1e4


def report(results: dict, args, ert: int, seeds: int, elapsed: float) -> None:
    rows = []
    print(f"\nERT target {ert} samples per detector = {1e4 / ert:.2f} false alarms per 10k; {seeds} seeds per stream")
    print(f"{'stream':<11} {'detector':<24} {'FA/10k':>7} {'FA ratio':>8} {'stream kind':<12} "
          f"{'delay':>7} {'detected':>8} {'us/sample':>9}")
    for group, dets in results.items():
        for name, r in dets.items():
            fa = _fa(r)
            kinds = r.delays or {"-": []}
            for kind, delays in kinds.items():
                row = {"stream": group, "detector": name, "fa_per_10k": fa, "fa_ratio": fa / (1e4 / ert),
                       "kind": kind, "mean_delay": float(np.mean(delays)) if delays else None,
                       "detection_rate": float(np.mean(r.detected[kind])) if delays else None,
                       "cost_us": None if math.isnan(r.cost_us) else r.cost_us,
                       "param": getattr(r, "param", None), "seeds": len(delays) or len(r.false_alarms)}
                rows.append(row)
                print(f"{group:<11} {name:<24} {fa:7.2f} {row['fa_ratio']:8.2f} {kind:<12} "
                      f"{row['mean_delay'] if delays else float('nan'):7.1f} "
                      f"{row['detection_rate'] if delays else float('nan'):8.2f} "
                      f"{r.cost_us:9.2f}")
    summary = bars(rows, ert)
    print("\nbars:")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ert": ert, "seeds": seeds, "tiny": args.tiny, "elapsed_s": elapsed,
                                    "rows": rows, "bars": summary}, indent=2))
    print(f"\nwrote {args.out} ({elapsed:.0f}s)")


def bars(rows: list[dict], ert: int) -> dict:
    """The issue's bars, computed from the rows."""
    ours = {"confidence", "feature_shift", "class_shift", "error_rate"}
    fa = {f"{r['stream']}/{r['detector']}": round(r["fa_ratio"], 2) for r in rows
          if r["detector"] in ours and r["stream"] in ("digits", "error_rate")}
    out: dict = {"calibration (FA ratio, target 0.5..2)": fa}
    for kind in ("abrupt", "gradual", "label_shift"):
        mine = [r for r in rows if r["stream"] == "digits" and r["detector"] == "monitor" and r["kind"] == kind]
        peers = [r for r in rows if r["stream"] == "digits" and r["detector"].startswith("river") and r["kind"] == kind]
        if mine and peers:
            best = min(peers, key=lambda r: r["mean_delay"])
            out[f"delay {kind} (monitor / best peer, target <= 0.8)"] = (
                f"{mine[0]['mean_delay']:.1f} / {best['mean_delay']:.1f} ({best['detector']}) = "
                f"{mine[0]['mean_delay'] / max(best['mean_delay'], 1e-9):.2f}")
    mon = [r for r in rows if r["stream"] == "digits" and r["detector"] == "monitor" and r["cost_us"]]
    if mon:
        out["cost (monitor us/sample, batch 32, target <= 20)"] = round(mon[0]["cost_us"], 2)
    return out


if __name__ == "__main__":
    main()
