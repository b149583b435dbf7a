"""Label-free healing benchmark: online error of source, norm-stats adaptation, TENT and SelfHealer.

Predict first, then adapt; every sample counts. One run, same streams, for the
demo CNN (BatchNorm) and a small LayerNorm MLP, at request batch sizes 64 and 1.
Writes bench/results/heal.json and prints a table.

Streams resample the digits test split (Digits-C corruptions implemented in
selfheal_bench.data; a domain is one corruption family, >= 2,000 samples):
clean; continual (every family at severity 5 in turn); gradual (severity
1-2-3-4-5-4-3-2-1 within each family); label shift (class priors drawn from
Dirichlet(0.1), redrawn every 1,000 samples); long continual (families cycled
at severity 5 for 100,000 samples).

    python scripts/bench_heal.py           # full run (~7 min)
    python scripts/bench_heal.py --tiny    # a smoke test
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo import split_reference, train  # noqa: E402

from selfheal_bench.data import CORRUPTIONS, corrupt, load_digits_split  # noqa: E402
from selfheal_core import HealConfig, SelfHealer  # noqa: E402

log = logging.getLogger("bench_heal")
REPO = Path(__file__).resolve().parent.parent


class LayerNormMLP(nn.Module):
    """A norm-free-statistics model: LayerNorm normalises each sample on its own."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.LayerNorm(128), nn.ReLU(),
                                 nn.Linear(128, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    x, y, _, _ = split_reference(seed, 300)
    model = LayerNormMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(40):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


# ----------------------------------------------------------------------------- streams
def make_streams(tiny: bool, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    _, _, x_te, y_te = load_digits_split(seed=0)
    n = len(y_te)
    rng = np.random.default_rng(seed)
    fams = sorted(CORRUPTIONS)
    dom = 200 if tiny else 2_000  # samples per domain

    def draw(count: int, name: str | None, sev: int, weights: np.ndarray | None = None):
        idx = torch.from_numpy(rng.choice(n, count, p=weights))
        x = x_te[idx]
        return (corrupt(x, name, sev, seed=int(rng.integers(1 << 30))) if name else x), y_te[idx]

    def cat(parts):
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    streams = {"clean": cat([draw(2_000 if tiny else 20_000, None, 0)]),
               "continual": cat([draw(dom, f, 5) for f in fams])}
    levels = [1, 2, 3, 4, 5, 4, 3, 2, 1]
    per = max(dom * 2 // len(levels), 1)  # each family's ramp lasts about two domains
    streams["gradual"] = cat([draw(per, f, s) for f in fams for s in levels])
    blocks = []
    for _ in range(4 if tiny else 20):
        priors = rng.dirichlet(np.full(10, 0.1))
        w = priors[y_te.numpy()]
        blocks.append(draw(250 if tiny else 1_000, None, 0, w / w.sum()))
    streams["label_shift"] = cat(blocks)
    long_n = 2_000 if tiny else 100_000
    streams["long_continual"] = cat([draw(dom, fams[i % len(fams)], 5) for i in range(long_n // dom)])
    return streams


# ----------------------------------------------------------------------------- methods
class Source:
    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).argmax(1)


class NormBatchStats(Source):
    """Schneider et al.: normalise with the test batch's own statistics (BatchNorm models only)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats, m.running_mean, m.running_var = False, None, None


class Tent(Source):
    """TENT as published: norm-layer affine parameters, entropy loss, Adam 1e-3, batch statistics."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        params = []
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats, m.running_mean, m.running_var = False, None, None
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                params += [m.weight, m.bias]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))

    @torch.enable_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        logp = logits.log_softmax(1)
        loss = -(logp.exp() * logp).sum(1).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return logits.detach().argmax(1)


class Healer(Source):
    def __init__(self, model: nn.Module, reference: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__(model)
        self.healer = SelfHealer(model, reference, HealConfig(), reference_labels=labels)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.healer.predict(x).argmax(1)


METHODS = {"source": Source, "norm_stats": NormBatchStats, "tent": Tent, "selfheal": Healer}


def run(method, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-sample correctness, predicting each request before the method adapts on it."""
    out = []
    for i in range(0, len(y), batch):
        out.append(method(x[i:i + batch]) == y[i:i + batch])
    return torch.cat(out).float()


def windows(correct: torch.Tensor, size: int = 1_000) -> np.ndarray:
    n = len(correct) // size
    return 1 - correct[: n * size].view(n, size).mean(1).numpy()


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "heal.json")
    ap.add_argument("--batches", default="64,1")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)  # the serving case: one worker, one core; also steadier timings
    t0 = time.time()
    cnn, _ = train(seed=0)
    _, _, x_ref, y_ref = split_reference(0, 300)
    models = {"cnn_bn": cnn, "mlp_ln": train_mlp()}
    streams = make_streams(args.tiny)
    rows, timing = [], {}
    for mname, model in models.items():
        for batch in [int(b) for b in args.batches.split(",")]:
            for sname, (x, y) in streams.items():
                base = None
                for meth, cls in METHODS.items():
                    m = copy.deepcopy(model)
                    method = cls(m, x_ref, y_ref) if meth == "selfheal" else cls(m)
                    start = time.perf_counter()
                    correct = run(method, x, y, batch)
                    elapsed = time.perf_counter() - start
                    err = 1 - correct.mean().item()
                    row = {"model": mname, "batch": batch, "stream": sname, "method": meth, "error": err,
                           "samples": len(y), "seconds": elapsed}
                    if sname == "long_continual":
                        w = windows(correct)
                        if meth == "source":
                            base = w
                        else:
                            row["worst_window_vs_source"] = float((w[2:] - base[2:]).max()) if len(w) > 2 else None
                    if meth == "selfheal":
                        row["corrector"] = method.healer.status()["corrector"]
                    rows.append(row)
                    log.info("%s b%d %-14s %-10s error %.4f (%.1fs)", mname, batch, sname, meth, err, elapsed)
        timing[mname] = time_per_request(model, x_ref, y_ref, streams["continual"][0])
    report(rows, timing, args, time.time() - t0)


def time_per_request(model: nn.Module, x_ref, y_ref, x: torch.Tensor, batch: int = 64) -> dict:
    """Amortised seconds per batch-64 request: plain forward vs SelfHealer.predict with healing on."""
    plain, heal = copy.deepcopy(model).eval(), Healer(copy.deepcopy(model), x_ref, y_ref)
    n = (len(x) // batch) * batch
    best = {}
    for name, fn in (("plain", lambda b: plain(b)), ("selfheal", heal)):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            with torch.no_grad():
                for i in range(0, n, batch):
                    fn(x[i:i + batch])
            times.append((time.perf_counter() - start) / (n / batch))
        best[name] = min(times)
    best["ratio"] = best["selfheal"] / best["plain"]
    return best


def report(rows: list[dict], timing: dict, args, elapsed: float) -> None:
    print(f"\n{'model':<7} {'batch':>5} {'stream':<15} " + " ".join(f"{m:>10}" for m in METHODS) + "  (online error)")
    keys = sorted({(r["model"], r["batch"], r["stream"]) for r in rows}, key=lambda k: (k[0], -k[1], k[2]))
    table = {(r["model"], r["batch"], r["stream"], r["method"]): r for r in rows}
    for k in keys:
        print(f"{k[0]:<7} {k[1]:>5} {k[2]:<15} " + " ".join(f"{table[k + (m,)]['error']:10.4f}" for m in METHODS))
    bars = {}
    for mname in {r["model"] for r in rows}:
        g = lambda b, s, m: table.get((mname, b, s, m), {}).get("error")  # noqa: E731
        b64 = {s: (g(64, s, "selfheal"), g(64, s, "tent"), g(64, s, "source")) for s in
               ("continual", "clean", "label_shift")}
        b1 = {s: (g(1, s, "selfheal"), g(1, s, "source")) for s in ("continual", "clean", "label_shift")}
        out = {}
        if None not in b64["continual"]:
            out["continual b64: selfheal / tent (<= 0.8)"] = round(b64["continual"][0] / b64["continual"][1], 3)
        if None not in b1["continual"]:
            out["continual b1: selfheal / source (<= 0.8)"] = round(b1["continual"][0] / b1["continual"][1], 3)
        for b, d in ((64, b64), (1, b1)):
            if d["clean"][0] is not None:
                out[f"clean b{b}: selfheal - source, points (<= 0.5)"] = round(100 * (d["clean"][0] - d["clean"][-1]), 3)
            if d["label_shift"][0] is not None:
                out[f"label shift b{b}: selfheal / source (<= 0.8)"] = round(
                    d["label_shift"][0] / max(d["label_shift"][-1], 1e-9), 3)
        for b in (64, 1):
            r = table.get((mname, b, "long_continual", "selfheal"))
            if r and r.get("worst_window_vs_source") is not None:
                out[f"long continual b{b}: worst 1k window - source, points (<= 2)"] = round(
                    100 * r["worst_window_vs_source"], 2)
        if mname in timing:
            out["time per b64 request: selfheal / plain forward (<= 2)"] = round(timing[mname]["ratio"], 2)
        bars[mname] = out
    print("\nbars:")
    for mname, out in bars.items():
        for k, v in out.items():
            print(f"  {mname}: {k}: {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tiny": args.tiny, "elapsed_s": elapsed, "rows": rows, "timing": timing,
                                    "bars": bars}, indent=2))
    print(f"\nwrote {args.out} ({elapsed:.0f}s)")


if __name__ == "__main__":
    main()
