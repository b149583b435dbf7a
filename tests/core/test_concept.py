"""Labels against the trusted reference: targeted relabelling held and reported, approve, discard,
a broken labeller during drift, bounded influence per pair."""
from __future__ import annotations

import copy

import pytest
import torch

from selfheal_bench.data import corrupt, resample
from selfheal_core import FileSnapshotStore, HealConfig, SelfHealer
from selfheal_core.config import GuardConfig
from selfheal_core.quarantine import Quarantine
from selfheal_core.storage import SQLiteFeedbackLog


def healer(model, reference, tmp_path, policy="hold"):
    # one update (and one snapshot) per request of 8 labels, not four: the same screening, a quarter the time
    config = HealConfig.from_dict({"snapshot_interval_s": 0.0, "guard": {"concept_change": policy},
                                   "learn": {"update_every": 8}})
    return SelfHealer(copy.deepcopy(model), reference[0], config, reference_labels=reference[1],
                      store=FileSnapshotStore(tmp_path / "snaps", keep=50),
                      feedback_log=SQLiteFeedbackLog(tmp_path / "fb.sqlite"))


def relabelled(digits, n, share, seed=0):
    """n clean training digits with labels; `share` of them a 3 labelled 8."""
    x_tr, y_tr, _, _ = digits
    g = torch.Generator().manual_seed(seed)
    threes = (y_tr == 3).nonzero().flatten()
    others = (y_tr != 3).nonzero().flatten()
    n_bad = int(n * share)
    idx = torch.cat([threes[torch.randint(0, len(threes), (n_bad,), generator=g)],
                     others[torch.randint(0, len(others), (n - n_bad,), generator=g)]])
    idx = idx[torch.randperm(n, generator=g)]
    y = y_tr[idx].clone()
    y[y == 3] = 8
    return x_tr[idx], y


def recall3(h, digits):
    """Class-3 recall of the served weights (a forward of the model itself: the probe is not traffic)."""
    _, _, x_te, y_te = digits
    with torch.no_grad():
        return float((h.model(x_te[y_te == 3]).argmax(1) == 3).float().mean())


def test_targeted_relabelling_is_held_and_reported(demo_model, reference, digits, tmp_path):
    h = healer(demo_model, reference, tmp_path)
    before = recall3(h, digits)
    x, y = relabelled(digits, 240, 0.2)
    for i in range(0, 240, 8):
        h.feedback(x[i:i + 8], y[i:i + 8])
    st = h.status()
    [pair] = [p for p in st["concept"]["suspected"] if p["pair"] == [3, 8]]
    assert pair["state"] == "suspected" and pair["count"] >= 40 and pair["since_seq"] is not None
    assert pair["learned"] == 0 and st["concept"]["held"] == pair["count"]
    by_status = st["feedback_log"]["by_status"]
    assert by_status["held"] + by_status.get("quarantined", 0) >= pair["count"]
    assert recall3(h, digits) >= before - 0.05, "nothing of the relabelling was learned"


def test_held_labels_beyond_the_holds_byte_budget_stay_in_the_log_and_are_counted(demo_model, reference, digits,
                                                                                 tmp_path):
    """Issue 28: the hold keeps inputs for an approval within `concept_hold_bytes` (2,000 224x224
    images were 1.2 GB); the rest are counted and stay in the log."""
    config = HealConfig.from_dict({"guard": {"concept_hold_bytes": 10 * 64 * 4}, "learn": {"update_every": 8}})
    h = SelfHealer(copy.deepcopy(demo_model), reference[0], config, reference_labels=reference[1],
                   feedback_log=SQLiteFeedbackLog(tmp_path / "fb.sqlite"))
    x, y = relabelled(digits, 240, 0.2)
    for i in range(0, 240, 8):
        h.feedback(x[i:i + 8], y[i:i + 8])
    concept = h.status()["concept"]
    [pair] = [p for p in concept["suspected"] if p["pair"] == [3, 8]]
    assert concept["held"] == 10 and concept["dropped"] == pair["count"] - 10 > 0
    assert h.status()["feedback_log"]["by_status"]["held"] >= pair["count"]


def test_hold_is_not_released_by_drift_the_attacker_sends(demo_model, reference, digits, tmp_path):
    """Issue 26 B: clean 3s labelled 8 (30%) while the attacker sends contrast-5 images to the
    inference port. The confidence alarm counted as corroboration and 458 of 600 were learned."""
    h = healer(demo_model, reference, tmp_path)
    before = recall3(h, digits)
    x, y = relabelled(digits, 240, 0.3, seed=7)
    x_tr = digits[0]
    traffic = corrupt(x_tr[torch.randint(0, len(x_tr), (240,), generator=torch.Generator().manual_seed(7))],
                      "contrast", 5, seed=7)
    for i in range(0, 240, 8):
        h.predict(traffic[i:i + 8])
        h.feedback(x[i:i + 8], y[i:i + 8])
    st = h.status()
    assert "confidence" in st["drift"]["firing"], "the attacker's traffic raised the alarm"
    assert any(p["pair"] == [3, 8] and p["state"] == "suspected" for p in st["concept"]["suspected"])
    by_status = st["feedback_log"]["by_status"]
    assert by_status.get("held", 0) + by_status.get("quarantined", 0) >= 0.9 * int(0.3 * 240), by_status
    # the weights learned, read as the reference is (serving's statistics follow the attacker's traffic)
    with torch.no_grad(), h.learner._source_norms():
        learned = float((h.learner.model(digits[2][digits[3] == 3]).argmax(1) == 3).float().mean())
    assert learned >= before - 0.1, "the red team's run: class-3 recall 1.000 -> 0.016"


def test_inputs_scaled_out_of_the_radius_are_still_judged(demo_model, reference, digits, tmp_path):
    """Issue 26 C: 3s scaled by 1.6 and labelled 8 lay beyond the reference's radius, were never
    judged and all learned. By direction the reference still speaks for them."""
    h = healer(demo_model, reference, tmp_path)
    before = recall3(h, digits)
    x, y = relabelled(digits, 240, 0.3, seed=8)
    x = torch.where((y == 8)[:, None, None, None], x * 1.6, x)  # the relabelled 3s (and honest 8s) scaled
    for i in range(0, 240, 8):
        h.predict(x[i:i + 8])
        h.feedback(x[i:i + 8], y[i:i + 8])
    st = h.status()
    assert any(p["pair"] == [3, 8] for p in st["concept"]["suspected"]), "reported"
    assert st["concept"]["held"] >= 40, st["concept"]
    assert recall3(h, digits) >= before - 0.1


def test_poisoned_inputs_beyond_the_references_reach_are_held_on_the_source_models_word(demo_model, reference,
                                                                                       digits, tmp_path):
    """Issue 26 C, the rest of it: by direction the reference speaks for most scaled 3s, not for the
    ones that sit between 3s and 8s. Each of those was learned, the model then served them as 8s,
    and their repeats contradicted nothing (15 of 180 learned, probe accuracy -1.7 points). Once
    the pair is suspected, the source weights' confident answer stands in where the reference is
    silent, and what was learned of the pair before it was suspected is taken back."""
    h = healer(demo_model, reference, tmp_path)
    x, y = relabelled(digits, 320, 0.3, seed=10)
    with torch.no_grad():
        bad = (y == 8) & (demo_model(x).argmax(1) == 3)  # the relabelled 3s (the honest 8s are served as 8)
    x = torch.where(bad[:, None, None, None], x * 1.6, x)
    for i in range(0, len(y), 8):
        h.predict(x[i:i + 8])
        h.feedback(x[i:i + 8], y[i:i + 8])
    statuses = {}
    for rows in h.feedback_log.entries():
        statuses.update(dict(zip(rows.seq, rows.status)))
    learned = [k for k in bad.nonzero().flatten().tolist() if statuses[k + 1] == "learned"]
    assert len(learned) <= 2, f"{len(learned)} of {int(bad.sum())} poisoned labels learned"
    replayed = h.learner.gradient.buffer
    keys = {x[k].numpy().tobytes() for k in bad.nonzero().flatten().tolist()}
    items = list(replayed._recent) + replayed._reservoir
    assert sum(xi.numpy().tobytes() in keys and int(yi) == 8 for xi, yi in items) <= len(learned)


def test_a_broken_labellers_labels_learned_before_the_quarantine_saw_it_are_taken_back(demo_model, reference,
                                                                                       digits, tmp_path):
    """A broken labeller (30% of labels set to 8) during drift: its first labels came before the
    quarantine's window had enough to tell, were learned, replayed and held back for the guard
    ever after (rotated accuracy 9 points below honest labels on one stream). When class 8 is
    quarantined they leave replay and the holdout, and the log says quarantined."""
    x_tr, y_tr, _, _ = digits
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, len(y_tr), (240,), generator=g)
    x, true = corrupt(x_tr[idx], "rotate", 4, seed=5), y_tr[idx]
    flip = (torch.rand(240, generator=g) < 0.3) & (true != 8)
    given = torch.where(flip, torch.full_like(true, 8), true)
    h = healer(demo_model, reference, tmp_path)
    for i in range(0, 240, 8):
        h.predict(x[i:i + 8])
        h.feedback(x[i:i + 8], given[i:i + 8])
    st = h.status()
    assert 8 in st["quarantine"]["classes"] and st["counters"]["taken_back"] > 0, st["counters"]
    statuses = {}
    for rows in h.feedback_log.entries():
        statuses.update(dict(zip(rows.seq, rows.status)))
    broken = {x[k].numpy().tobytes() for k in flip.nonzero().flatten().tolist()}
    kept = list(h.learner.gradient.buffer._recent) + h.learner.gradient.buffer._reservoir
    kept += list(h.learner.guard._holdout)
    remembered = sum(xi.numpy().tobytes() in broken and int(yi) == 8 for xi, yi in kept)
    learned = sum(statuses[k + 1] == "learned" for k in flip.nonzero().flatten().tolist())
    assert remembered == learned <= 3, (remembered, learned)


def test_approval_learns_the_new_concept_and_the_reference_follows(demo_model, reference, digits, tmp_path):
    h = healer(demo_model, reference, tmp_path)
    x, y = relabelled(digits, 240, 0.3, seed=1)
    for i in range(0, 240, 8):
        h.feedback(x[i:i + 8], y[i:i + 8])
    result = h.decide(3, 8, "approve")
    assert result["released"] > 0 and h.status()["concept"]["held"] == 0
    assert h.learner.concept.reference_labels.eq(3).sum() == 0, "the reference's 3s now mean 8"
    x2, y2 = relabelled(digits, 160, 0.5, seed=2)
    for i in range(0, 160, 8):
        h.feedback(x2[i:i + 8], y2[i:i + 8])
    assert recall3(h, digits) < 0.5, "approved: the model learns that these inputs are 8s"


@pytest.mark.slow
def test_an_approved_swap_relabels_the_reference_at_once_and_is_learned(demo_model, reference, digits, tmp_path):
    """Classes 1 and 7 trade meaning; an operator approves both relabellings once reported. The
    second approval used to map the reference's new 7s back to 1 (both classes merged), and the
    swapped classes stayed wrong after approval (issue 26: a text model, 1.5% and 7.8% right)."""
    h = SelfHealer(copy.deepcopy(demo_model), reference[0], reference_labels=reference[1])  # no store: faster
    x_tr, y_tr, x_te, y_te = digits
    trusted = reference[1]
    g = torch.Generator().manual_seed(11)
    idx = torch.randint(0, len(y_tr), (800,), generator=g)
    x, y = x_tr[idx], y_tr[idx].clone()
    swap = {1: 7, 7: 1}
    y = torch.tensor([swap.get(int(v), int(v)) for v in y])
    approved = set()
    for i in range(0, len(y), 8):
        h.predict(x[i:i + 8])
        h.feedback(x[i:i + 8], y[i:i + 8])
        suspected = [p["pair"] for p in h.learner.concept.suspected] if len(approved) < 2 else []
        for pair in ((1, 7), (7, 1)):
            if pair not in approved and list(pair) in suspected:
                h.decide(*pair, "approve")
                approved.add(pair)
    assert approved == {(1, 7), (7, 1)}, "both relabellings reported"
    labels = h.learner.concept.reference_labels
    assert torch.equal(labels[trusted == 1], torch.full_like(labels[trusted == 1], 7))
    assert torch.equal(labels[trusted == 7], torch.full_like(labels[trusted == 7], 1)), "a swap, not a merge"
    with torch.no_grad():
        pred = h.model(x_te).argmax(1)
    for old, new in swap.items():
        assert float((pred[y_te == old] == new).float().mean()) >= 0.7, f"class {old} inputs now answered {new}"


@pytest.mark.slow
def test_discard_under_learn_returns_to_a_version_from_before(demo_model, reference, digits, tmp_path):
    h = healer(demo_model, reference, tmp_path, policy="learn")
    before = recall3(h, digits)
    x, y = relabelled(digits, 480, 0.3, seed=3)
    for i in range(0, 480, 8):
        h.feedback(x[i:i + 8], y[i:i + 8])
    [pair] = [p for p in h.status()["concept"]["suspected"] if p["pair"] == [3, 8]]
    assert pair["state"] == "learning" and pair["learned"] > 0, "learn: corroborated, then learned (bounded)"
    window = h.config.guard.concept_rate_window
    cap = h.learner.concept.rate_cap(3)  # what class 3 brings in a window at its reference share
    assert cap == -(-int((reference[1] == 3).sum()) * window // len(reference[1]))
    assert pair["learned"] <= cap * (480 // window + 1)
    result = h.decide(3, 8, "discard")
    assert result["restored_version"] is not None
    assert recall3(h, digits) >= before - 0.05, "back to what it was before the relabelling"
    assert h.status()["feedback_log"]["by_status"].get("learned", 0) > 0, "honest labels re-read and learned"
    x3, y3 = relabelled(digits, 80, 0.5, seed=4)
    for i in range(0, 80, 8):
        h.feedback(x3[i:i + 8], y3[i:i + 8])
    assert recall3(h, digits) >= before - 0.05, "a discarded relabelling is not learned later"


def test_drifted_inputs_are_not_judged_by_the_reference(demo_model, reference, digits, tmp_path):
    """Rotated digits sit far from the reference: their labels correct the model, none is held."""
    h = healer(demo_model, reference, tmp_path)
    _, _, x_te, y_te = digits
    x, y = resample(x_te, y_te, 200, seed=5)
    x = corrupt(x, "rotate", 4, seed=5)
    for i in range(0, 200, 8):
        h.predict(x[i:i + 8])
        h.feedback(x[i:i + 8], y[i:i + 8])
    st = h.status()
    assert st["concept"]["held"] <= 10, st["concept"]
    assert st["counters"]["updates"] > 0


def test_decisions_on_unknown_pairs_are_refused(demo_model, reference, tmp_path):
    h = healer(demo_model, reference, tmp_path)
    with pytest.raises(KeyError, match="2 -> 5"):
        h.decide(2, 5, "approve")
    with pytest.raises(ValueError, match="approve or discard"):
        h.decide(2, 5, "maybe")


def screen(q, served, given, conf=0.5, drifted=True):
    return q.screen(torch.tensor(served), torch.tensor(given), torch.full((len(given),), conf), drifted)


def test_a_broken_labeller_is_quarantined_under_drift():
    """Drift makes the model unsure: a labeller pushing 30% of all labels to 8 is caught anyway."""
    q = Quarantine(GuardConfig(), reference_share=torch.full((10,), 0.1))
    g = torch.Generator().manual_seed(0)
    served = torch.randint(0, 10, (400,), generator=g)
    true = torch.where(torch.rand(400, generator=g) < 0.5, served, torch.randint(0, 10, (400,), generator=g))
    broken = torch.where(torch.rand(400, generator=g) < 0.3, torch.full_like(true, 8), true)
    held = screen(q, served.tolist(), broken.tolist())
    bad = (broken == 8) & (true != 8) & (served != 8)
    assert held[bad][100:].float().mean() >= 0.9 and q.status()["classes"] == [8]
    honest = Quarantine(GuardConfig(), reference_share=torch.full((10,), 0.1))
    assert screen(honest, served.tolist(), true.tolist()).float().mean() < 0.05, "honest labels under drift pass"


def test_label_shift_is_not_a_broken_labeller():
    """Class 2 becomes common and the model sees it: labels agree with what was served."""
    q = Quarantine(GuardConfig(), reference_share=torch.full((10,), 0.1))
    given = [2] * 150 + list(range(10)) * 5
    assert not screen(q, given, given, conf=0.9, drifted=False).any()


def test_bounded_influence_per_pair():
    q = Quarantine(GuardConfig(pair_max_rate=5, pair_rate_window=50, corroborate=1))
    held = screen(q, [1] * 20, [7] * 20, conf=0.95, drifted=True)
    assert held.sum() == 15 and q.status()["held_rate"] == 15


def clusters(n_per: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well separated classes in 2-D feature space (features stand in for the model's)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    y = torch.arange(3).repeat_interleave(n_per)
    return centres[y] + 0.5 * torch.randn(len(y), 2, generator=g), y


def watch_learning(**guard) -> tuple:
    from selfheal_core.concept import ConceptWatch

    w = ConceptWatch(GuardConfig(concept_change="learn", **guard))
    w.fit(*clusters(40, seed=0))
    return w


def feed(w, feats, given):
    n = len(given)
    return w.screen(feats, given, feats, list(range(n)), [0.0] * n)


def test_learn_policy_learns_a_swapped_class_and_releases_its_corroboration_window():
    """Every class-1 label now says 2: corroborated after `concept_corroborate` labels; those
    held labels are then released to training, within the pair's rate (its class's share)."""
    w = watch_learning()
    f, y = clusters(30, seed=1)
    given = torch.where(y == 1, torch.tensor(2), y)
    held = feed(w, f, given)
    [pair] = [p for p in w.suspected if p["pair"] == [1, 2]]
    assert pair["state"] == "learning"
    c = w.config.concept_corroborate
    n_held = int(held.sum())
    assert c - 1 <= n_held <= 2 * c, "held until corroborated (5 labels, half of the 10 nearest), the rest learned"
    released = w.release()
    assert [r[2] for r in released] == [2] * n_held and w.status()["held"] == 0
    assert w.rate_cap(1) == -(-w.config.concept_rate_window // 3), "a third of the reference: a third of a window"


def test_label_noise_is_never_corroborated_as_a_concept_change():
    """10% of labels wrong at random over a long stream: pairs pass `concept_corroborate` in count
    but never say what most recent labels around them say, so nothing is learned against the reference."""
    w = watch_learning()
    g = torch.Generator().manual_seed(2)
    for seed in range(20):
        f, y = clusters(30, seed=10 + seed)
        noisy = torch.where(torch.rand(len(y), generator=g) < 0.1, torch.randint(0, 3, (len(y),), generator=g), y)
        feed(w, f, noisy)
    assert max(p["count"] for p in w.suspected) >= w.config.concept_corroborate
    assert all(p["state"] == "suspected" and p["learned"] == 0 for p in w.suspected)
    assert w.release() == []


def test_concept_state_from_before_the_recent_labels_loads():
    w = watch_learning()
    f, y = clusters(10, seed=3)
    feed(w, f, torch.where(y == 1, torch.tensor(2), y))
    state = w.state_dict()
    assert len(state["_recent_y"]) > 0 and set(state["_recent_y"].tolist()) <= {0, 2}
    del state["_recent_x"], state["_recent_y"]
    fresh = watch_learning()
    fresh.load_state_dict(state)
    assert fresh.suspected == w.suspected and len(fresh.state_dict()["_recent_y"]) == 0


def test_quarantined_labels_neither_corroborate_nor_get_released():
    """Labels the quarantine already holds as poisoning are not judged by the concept watch: a
    relabelling carried only by them is never corroborated, and none of them is learned through it."""
    w = watch_learning()
    f, y = clusters(30, seed=5)
    given = torch.where(y == 1, torch.tensor(2), y)
    n = len(given)
    held = w.screen(f, given, f, list(range(n)), [0.0] * n, skip=y == 1)
    assert not held.any() and w.suspected == [] and w.release() == []
    recent = w.state_dict()["_recent_y"]
    assert 0 < int((recent == 2).sum()) <= int((y == 2).sum()), "quarantined labels are not recent consensus"


def test_a_sporadic_contradiction_is_learned_after_the_rate_window_a_repeated_one_stays_held():
    """Under hold, honest labels the reference spoke for wrongly (drifted inputs) were held for
    good: 11 of 600 on rotated digits. A pair still short of concept_min_count rate_window labels
    after its first contradiction is released; a pair that repeats is suspected and stays held."""
    from selfheal_core.concept import ConceptWatch

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    ref_y = torch.arange(3).repeat_interleave(40)
    ref_x = centres[ref_y] + torch.randn(120, 2, generator=g) * 0.5
    watch = ConceptWatch(GuardConfig(concept_change="hold", concept_rate_window=50))
    watch.fit(ref_x, ref_y)

    def screen(x, labels, start):
        seqs = list(range(start, start + len(labels)))
        return watch.screen(x, labels, x, seqs, [0.0] * len(labels))

    lone = centres[0:1] + 0.1  # among the 0s, labelled 2: once
    attack = centres[2:3].repeat(6, 1) + 0.1  # among the 2s, labelled 1: six times
    assert screen(lone, torch.tensor([2]), 1).all()
    assert screen(attack, torch.ones(6, dtype=torch.long), 2).all()
    assert watch.release() == []  # not stale yet
    honest_y = torch.randint(0, 3, (60,), generator=g)
    assert not screen(centres[honest_y] + 0.1, honest_y, 8).any()
    released = watch.release()
    assert [r[0] for r in released] == [1] and released[0][2] == 2  # the lone one only
    assert [p["pair"] for p in watch.suspected] == [[2, 1]] and watch.status()["held"] == 6


def test_sporadic_pairs_into_one_class_from_many_sources_stay_held():
    """A broken labeller calls inputs of every class an 8: each (source, 8) pair alone is sporadic,
    but together they come into one class far more often than once per rate window: held."""
    from selfheal_core.concept import ConceptWatch

    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    ref_y = torch.arange(4).repeat_interleave(30)
    watch = ConceptWatch(GuardConfig(concept_change="hold", concept_rate_window=50))
    watch.fit(centres[ref_y] + torch.randn(120, 2, generator=g) * 0.5, ref_y)
    x = centres[:3] + 0.1  # one each from classes 0, 1 and 2, all called 3: each pair alone is sporadic
    assert watch.screen(x, torch.full((3,), 3), x, [1, 2, 3], [0.0] * 3).all()
    honest_y = torch.randint(0, 4, (60,), generator=g)
    watch.screen(centres[honest_y] + 0.1, honest_y, centres[honest_y], list(range(4, 64)), [0.0] * 60)
    assert watch.release() == [] and watch.status()["held"] == 3

