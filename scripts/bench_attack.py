"""Attacks on the feedback channel, and an honest concept change, against the digits demo model.

Everything runs through `SelfHealer` with a SQLite feedback log and a snapshot store (what the
learner process runs), labels in requests of 8, on a clean probe of the 593 test digits:
- targeted_10, targeted_30: 600 labels on clean training digits, 10% / 30% of them a 3 labelled 8
  (policy hold);
- drip_2: 1,200 labels, 2% of them a 3 labelled 8 (hold);
- targeted_10_learn_discard: targeted_10 under policy learn; once the relabelling is reported an
  operator discards it;
- broken_labeller_drift: rotated digits (rotate-4), 30% of the labels set to 8 by a broken
  labeller; rotated accuracy compared with the same run on clean labels (mean of three streams);
- drift_assisted_30: targeted_30 while the attacker sends contrast-5 images to the inference port
  (a confidence alarm once released held labels);
- out_of_radius_30: targeted_30 with the poisoned 3s scaled by 1.6 (beyond the reference's radius);
- huge_input: one request of 8 digits of pixels 1e18 (and 3e38, 1e6) once adaptation is on; clean
  accuracy served before and after;
- concept_approved: the concept change of bench_feedback (classes 1 and 7 trade labels, inputs
  clean) with an operator approving both relabellings once reported; gap closed to an oracle
  retrained on the swapped training split.
Writes bench/results/attack.json; per scenario: probe_accuracy_before, probe_accuracy_after,
worst_class_recall_drop (points), quarantined (labels held or quarantined), reported.

    python scripts/bench_attack.py          # ~15 min on 2 cores
    python scripts/bench_attack.py --tiny   # a smoke test
"""
from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import torch

from selfheal_bench.data import corrupt, load_digits_split
from selfheal_bench.harness import RESULTS, Bar, demo_model, write_report
from selfheal_bench.train import fit
from selfheal_core import FileSnapshotStore, HealConfig, SelfHealer
from selfheal_core.storage import SQLiteFeedbackLog

log = logging.getLogger("bench_attack")
SOURCE, TARGET = 3, 8  # the targeted relabelling
SWAP = (1, 7)  # the concept change


def predicted(healer: SelfHealer, x) -> torch.Tensor:
    """The served weights' classes for a probe (a forward of the model itself: probes are not traffic)."""
    with torch.no_grad():
        return torch.cat([healer.model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])


def recall(healer: SelfHealer, x, y) -> torch.Tensor:
    pred = predicted(healer, x)
    return torch.stack([(pred[y == k] == k).float().mean() for k in range(10)])


def make_healer(model, x_ref, y_ref, work: Path, policy: str) -> SelfHealer:
    config = HealConfig.from_dict({"snapshot_interval_s": 0.0, "guard": {"concept_change": policy}})
    return SelfHealer(copy.deepcopy(model), x_ref, config, reference_labels=y_ref,
                      store=FileSnapshotStore(work / "snapshots", keep=50),
                      feedback_log=SQLiteFeedbackLog(work / "feedback.sqlite"))


def poisoned(n: int, share: float, seed: int, x_pool, y_pool):
    """n labelled samples, `share` of them a SOURCE labelled TARGET, the rest honest (poison spread
    evenly through the stream); returns (x, given, poisoned mask)."""
    g = torch.Generator().manual_seed(seed)
    n_bad = int(round(n * share))
    sources = (y_pool == SOURCE).nonzero().flatten()
    others = (y_pool != SOURCE).nonzero().flatten()
    bad = sources[torch.randint(0, len(sources), (n_bad,), generator=g)]
    good = others[torch.randint(0, len(others), (n - n_bad,), generator=g)]
    order = torch.randperm(n, generator=g)
    idx = torch.cat([bad, good])[order]
    mask = torch.cat([torch.ones(n_bad, dtype=torch.bool), torch.zeros(n - n_bad, dtype=torch.bool)])[order]
    given = y_pool[idx].clone()
    given[mask] = TARGET
    return x_pool[idx], given, mask


def feed(healer: SelfHealer, x, y, batch: int = 8, on_report=None, traffic=None) -> None:
    """Serve each input (so the monitor sees the stream), then give its label one request later.
    `traffic`: other inputs served instead (an attacker's, to drift what the monitor sees)."""
    pending = None
    for i in range(0, len(y), batch):
        healer.predict((traffic if traffic is not None else x)[i:i + batch])
        if pending is not None:
            healer.feedback(*pending)
        pending = (x[i:i + batch], y[i:i + batch])
        if on_report is not None:
            on_report(healer)
    healer.feedback(*pending)


def reported(healer: SelfHealer, pair) -> bool:
    concept = healer.status()["concept"]
    return any(p["pair"] == list(pair) for p in concept["suspected"])


def held_count(healer: SelfHealer) -> int:
    st = healer.status()
    return int(st["feedback_log"]["by_status"].get("held", 0) + st["feedback_log"]["by_status"].get("quarantined", 0)
               + st["feedback_log"]["by_status"].get("discarded", 0))


def scenario(name, healer, probe, run, pair=(SOURCE, TARGET)) -> dict:
    x_p, y_p = probe
    before, acc_before = recall(healer, x_p, y_p), float((predicted(healer, x_p) == y_p).float().mean())
    extra = run(healer) or {}
    after, acc_after = recall(healer, x_p, y_p), float((predicted(healer, x_p) == y_p).float().mean())
    row = {"probe_accuracy_before": acc_before, "probe_accuracy_after": acc_after,
           "worst_class_recall_drop": round(100 * float((before - after).max()), 2),
           "quarantined": held_count(healer), "reported": reported(healer, pair), **extra}
    log.info("%s: %s", name, {k: row[k] for k in ("probe_accuracy_before", "probe_accuracy_after",
                                                     "worst_class_recall_drop", "quarantined", "reported")})
    return row


def huge_input(model, x_ref, y_ref, x_te, y_te, work: Path) -> dict:
    """Red team case A: once a confidence alarm switched statistics adaptation on, one request of 8
    digits whose pixels are 1e18 (then 3e38); clean accuracy of what is served before and after."""
    healer = make_healer(model, x_ref, y_ref, work, "hold")
    for i in range(0, 400, 16):  # contrast drift: the alarm starts adaptation
        healer.predict(corrupt(x_te[i % len(x_te):][:16], "contrast", 5, seed=i))
    adapting = bool(healer.status()["label_free"]["norm_stats"]["active"])
    served = lambda: float((torch.cat([healer.predict(x_te[i:i + 64]).argmax(1)  # noqa: E731
                                       for i in range(0, len(x_te), 64)]) == y_te).float().mean())
    before = served()
    for value in (1e18, 3e38, 1e6):
        healer.predict(torch.full((8,) + tuple(x_te.shape[1:]), value))
    after = served()
    status = healer.status()
    row = {"adapting_before_attack": adapting, "clean_accuracy_before": before, "clean_accuracy_after": after,
           "implausible_counted": status["counters"]["implausible"],
           "nonfinite_resets": status["label_free"]["nonfinite_resets"],
           "probe_accuracy_before": before, "probe_accuracy_after": after, "worst_class_recall_drop": None,
           "quarantined": 0, "reported": status["counters"]["implausible"] > 0}
    log.info("huge_input: %s", row)
    return row


def broken_labeller(model, x_ref, y_ref, x_tr, y_tr, x_te, y_te, work: Path, seed: int, scale: float) -> dict:
    """Rotated digits (rotate-4), 20% labelled, 30% of the labels set to 8 by a broken labeller;
    rotated accuracy against the same stream with honest labels, and what was held of each."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(y_tr), (int(2000 * scale),), generator=g)
    x_rot, y_rot = corrupt(x_tr[idx], "rotate", 4, seed=seed), y_tr[idx]
    label_every = 5  # 20% of the stream labelled
    lab = torch.arange(len(y_rot)) % label_every == 0
    broken = y_rot.clone()
    flip = (torch.rand(len(broken), generator=g) < 0.30) & (broken != TARGET)
    broken[flip] = TARGET
    rot_probe = (corrupt(x_te, "rotate", 4, seed=seed + 1), y_te)
    accuracy, row = {}, {}
    for labels_name, labels in (("clean", y_rot), ("broken", broken)):
        h = make_healer(model, x_ref, y_ref, work / labels_name, "hold")
        pending = None
        for i in range(0, len(y_rot), 8):
            h.predict(x_rot[i:i + 8])
            if pending is not None and pending[0].numel():
                h.feedback(*pending)
            m = lab[i:i + 8]
            pending = (x_rot[i:i + 8][m], labels[i:i + 8][m])
        accuracy[labels_name] = float((predicted(h, rot_probe[0]) == rot_probe[1]).float().mean())
        if labels_name == "broken":
            bad_seqs = set((torch.arange(len(y_rot))[lab][flip[lab]]).tolist())
            order = torch.arange(len(y_rot))[lab].tolist()  # log seq k+1 <-> k-th labelled sample
            statuses = {}
            for rows in h.feedback_log.entries():
                statuses.update(dict(zip(rows.seq, rows.status)))
            held = [k for k, sample in enumerate(order) if statuses.get(k + 1) in ("held", "quarantined")]
            caught = sum(1 for k in held if order[k] in bad_seqs)
            row = {"bad_labels": len(bad_seqs), "bad_quarantined": caught, "honest_held": len(held) - caught,
                   "quarantined": len(held), "reported": bool(h.status()["quarantine"]["classes"]) or caught > 0}
    return {"seed": seed, "rotated_accuracy_clean_labels": accuracy["clean"],
            "rotated_accuracy_broken_labels": accuracy["broken"], **row}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "attack.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("selfheal_core").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    started = time.time()
    model, x_ref, y_ref = demo_model()
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    probe = (x_te, y_te)
    scale = 0.25 if args.tiny else 1.0
    n600, n1200 = int(600 * scale), int(1200 * scale)
    results: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="bench_attack-"))

    for name, n, share, seed in (("targeted_10", n600, 0.10, 1), ("targeted_30", n600, 0.30, 2),
                                 ("drip_2", n1200, 0.02, 3)):
        x, given, _ = poisoned(n, share, seed, x_tr, y_tr)
        healer = make_healer(model, x_ref, y_ref, work / name, "hold")
        results[name] = scenario(name, healer, probe, lambda h: feed(h, x, given))

    # poisoning that tries to escape the screen: the attacker drifts the traffic (contrast-5 images
    # to the inference port) beside clean 3s labelled 8, or scales its poisoned 3s by 1.6 so they
    # lie beyond the reference's radius in feature space
    x, given, bad = poisoned(n600, 0.30, 8, x_tr, y_tr)
    traffic = corrupt(x_tr[torch.randint(0, len(y_tr), (n600,), generator=torch.Generator().manual_seed(9))],
                      "contrast", 5, seed=9)
    healer = make_healer(model, x_ref, y_ref, work / "drift_assisted", "hold")
    results["drift_assisted_30"] = scenario("drift_assisted_30", healer, probe,
                                            lambda h: feed(h, x, given, traffic=traffic))
    x, given, bad = poisoned(n600, 0.30, 10, x_tr, y_tr)
    x = torch.where(bad[:, None, None, None], x * 1.6, x)
    healer = make_healer(model, x_ref, y_ref, work / "out_of_radius", "hold")
    results["out_of_radius_30"] = scenario("out_of_radius_30", healer, probe, lambda h: feed(h, x, given))
    results["huge_input"] = huge_input(model, x_ref, y_ref, x_te, y_te, work / "huge")

    # policy learn, then an operator discards the relabelling once it is reported
    x, given, _ = poisoned(n600, 0.10, 1, x_tr, y_tr)
    healer = make_healer(model, x_ref, y_ref, work / "learn", "learn")

    def learn_then_discard(h: SelfHealer) -> dict:
        feed(h, x, given)
        learned = next((p["learned"] for p in h.status()["concept"]["suspected"]
                        if p["pair"] == [SOURCE, TARGET]), 0)
        decision = h.decide(SOURCE, TARGET, "discard") if reported(h, (SOURCE, TARGET)) else None
        return {"learned_before_discard": learned, "decision": decision}

    results["targeted_10_learn_discard"] = scenario("targeted_10_learn_discard", healer, probe, learn_then_discard)

    # a broken labeller during input drift, against the same drift with honest labels; over three
    # streams: one stream's gap moves by +-2 points with the order labels happen to be learned in
    runs = [broken_labeller(model, x_ref, y_ref, x_tr, y_tr, x_te, y_te, work / f"rot-{seed}", seed, scale)
            for seed in (4, 5, 6)]
    bad, caught = sum(r["bad_labels"] for r in runs), sum(r["bad_quarantined"] for r in runs)
    mean = lambda key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
    results["broken_labeller_drift"] = {
        "rotated_accuracy_clean_labels": mean("rotated_accuracy_clean_labels"),
        "rotated_accuracy_broken_labels": mean("rotated_accuracy_broken_labels"),
        "bad_labels": bad, "bad_quarantined": caught, "bad_quarantined_share": caught / max(bad, 1),
        "honest_held": sum(r["honest_held"] for r in runs), "quarantined": sum(r["quarantined"] for r in runs),
        "reported": all(r["reported"] for r in runs), "streams": runs,
        "probe_accuracy_before": None, "probe_accuracy_after": mean("rotated_accuracy_broken_labels"),
        "worst_class_recall_drop": None}
    log.info("broken_labeller_drift: %s", {k: v for k, v in results["broken_labeller_drift"].items() if k != "streams"})

    # an honest concept change, approved by an operator once reported
    def swap(y):
        out = y.clone()
        out[y == SWAP[0]], out[y == SWAP[1]] = SWAP[1], SWAP[0]
        return out

    n_concept = int(3000 * scale)
    idx = torch.randint(0, len(y_te), (n_concept,), generator=torch.Generator().manual_seed(6))
    x_c, y_c = x_te[idx], swap(y_te[idx])
    oracle = fit(copy.deepcopy(model), x_tr, swap(y_tr), 2 if args.tiny else 15, lr=1e-3, batch=32, seed=None)
    h = make_healer(model, x_ref, y_ref, work / "concept", "hold")
    served, approved_at = [], {}
    g = torch.Generator().manual_seed(7)
    pending = None
    for i in range(0, n_concept, 8):
        served.append(h.predict(x_c[i:i + 8]).argmax(1))
        if pending is not None and pending[0].numel():
            h.feedback(*pending)
        for pair in ((SWAP[0], SWAP[1]), (SWAP[1], SWAP[0])):
            if pair not in approved_at and reported(h, pair):
                h.decide(*pair, "approve")  # the operator reads GET /feedback and approves
                approved_at[pair] = i
        m = torch.rand(min(8, n_concept - i), generator=g) < 0.10
        pending = (x_c[i:i + 8][m], y_c[i:i + 8][m])
    correct = (torch.cat(served) == y_c).float()
    skip = n_concept // 3
    with torch.no_grad():
        static_err = 1 - float((model(x_c[skip:]).argmax(1) == y_c[skip:]).float().mean())
        oracle_err = 1 - float((oracle(x_c[skip:]).argmax(1) == y_c[skip:]).float().mean())
    err = 1 - float(correct[skip:].mean())
    results["concept_approved"] = {
        "static_error": static_err, "oracle_error": oracle_err, "selfheal_error": err,
        "gap_closed": (static_err - err) / max(static_err - oracle_err, 1e-9),
        "approved_after_samples": {f"{a}->{b}": v for (a, b), v in approved_at.items()},
        "reported": len(approved_at) == 2, "quarantined": held_count(h),
        "probe_accuracy_before": None, "probe_accuracy_after": None, "worst_class_recall_drop": None}
    log.info("concept_approved: %s", results["concept_approved"])

    bars = []
    for name in ("targeted_10", "targeted_30", "drip_2", "targeted_10_learn_discard", "drift_assisted_30",
                 "out_of_radius_30"):
        r = results[name]
        drop = 100 * (r["probe_accuracy_before"] - r["probe_accuracy_after"])
        bars += [Bar(f"{name}: probe accuracy drop, points", round(drop, 2), "<=", 1.0),
                 Bar(f"{name}: worst class recall drop, points", r["worst_class_recall_drop"], "<=", 5.0),
                 Bar(f"{name}: reported", r["reported"], "==", True)]
    h = results["huge_input"]
    bars += [Bar("huge_input: clean accuracy drop after the request, points",
                 round(100 * (h["clean_accuracy_before"] - h["clean_accuracy_after"]), 2), "<=", 0.5),
             Bar("huge_input: adaptation was on when it came", h["adapting_before_attack"], "==", True)]
    b = results["broken_labeller_drift"]
    bars += [Bar("broken labeller: share of bad labels quarantined", round(b["bad_quarantined_share"], 3), ">=", 0.8),
             Bar("broken labeller: rotated accuracy, clean minus broken labels, points",
                 round(100 * (b["rotated_accuracy_clean_labels"] - b["rotated_accuracy_broken_labels"]), 2), "<=", 5.0),
             Bar("concept change approved: gap closed", round(results["concept_approved"]["gap_closed"], 3), ">=", 0.5)]
    print(f"\n{'scenario':<28} {'before':>7} {'after':>7} {'worst drop':>10} {'held':>6} {'reported':>8}")
    for name, r in results.items():
        fmt = lambda v: f"{v:7.3f}" if isinstance(v, float) else f"{'-':>7}"  # noqa: E731
        print(f"{name:<28} {fmt(r['probe_accuracy_before'])} {fmt(r['probe_accuracy_after'])} "
              f"{str(r['worst_class_recall_drop']):>10} {r['quarantined']:>6} {str(r['reported']):>8}")
    write_report(args.out, bars, started, tiny=args.tiny, **results)


if __name__ == "__main__":
    main()
