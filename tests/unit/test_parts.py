"""Norm-statistics corrector, replay buffer, gradient learner and guard."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from selfheal_core.config import GuardConfig, LearnConfig
from selfheal_core.correct import NormStatsAdapter
from selfheal_core.guard import Guard
from selfheal_core.learn import GradientLearner, ReplayBuffer, select_parameters


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 16, 3)).eval()


def test_norm_stats_adapts_at_batch_size_one_and_reset_restores_exactly():
    model = bn_model()
    bn = model[1]
    source = {k: v.clone() for k, v in model.state_dict().items()}
    ad = NormStatsAdapter(model, momentum=0.05)
    shifted = torch.randn(200, 1, 4, 4) * 3 + 5
    with torch.no_grad():
        target = model[0](shifted).mean(dim=(0, 2, 3))
        with ad.recording():
            model(shifted[:1])
    ad.observe()
    assert torch.equal(bn.running_mean, source["1.running_mean"]), "inactive adapter must not change stats"
    ad.activate()
    with torch.no_grad():
        for i in range(200):  # one input per request
            with ad.recording():
                model(shifted[i:i + 1])
            ad.observe()
    assert torch.allclose(bn.running_mean, target, atol=0.3 * target.abs().max())
    params = {k: v for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(v, source[k]) for k, v in params.items()), "only BN statistics may change"
    ad.reset()
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    assert not ad.active


def test_norm_stats_state_round_trip():
    model, other = bn_model(), bn_model()
    a, b = NormStatsAdapter(model), NormStatsAdapter(other)
    a.activate()
    with torch.no_grad(), a.recording():
        model(torch.randn(8, 1, 4, 4) + 2)
    a.observe()
    b.load_state_dict(a.state_dict())
    assert b.active and all(torch.equal(x, y) for x, y in zip(a._mean, b._mean))
    with pytest.raises(ValueError, match="mismatch"):
        b.load_state_dict({"_mean": []})


def test_replay_buffer_is_bounded_and_round_trips():
    buf = ReplayBuffer(recent_size=10, reservoir_size=5, seed=0)
    for i in range(100):
        buf.add(torch.full((1, 2), float(i)), torch.tensor([i % 3]))
    assert len(buf) == 15
    x, y = buf.sample(7)
    assert x.shape == (7, 2) and y.shape == (7,)
    other = ReplayBuffer(10, 5, seed=1)
    other.load_state_dict(buf.state_dict())
    assert torch.equal(other.sample(5)[0], buf.sample(5)[0])  # same contents, same generator state


def test_learner_changes_only_chosen_parameters_and_learns():
    model = bn_model()
    before = copy.deepcopy(model.state_dict())
    learner = GradientLearner(model, LearnConfig(params="last_layer", lr=0.05, steps=20, update_every=16))
    assert set(learner.params) == {"4.weight", "4.bias"}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 4, 4, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()  # learnable from the features
    loss0 = nn.functional.cross_entropy(model(x), y).item()
    assert learner.add(x, y)
    learner.step()
    loss1 = nn.functional.cross_entropy(model(x), y).item()
    assert loss1 < loss0
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"4.weight", "4.bias"}
    learner.reset()
    assert all(torch.equal(after[k], before[k]) for k in after)


def test_norm_and_last_selects_affine_parameters():
    assert set(select_parameters(bn_model(), "norm_and_last")) == {"1.weight", "1.bias", "4.weight", "4.bias"}
    with pytest.raises(ValueError, match="no nn.Linear"):
        select_parameters(nn.Sequential(nn.Conv2d(1, 1, 1)), "last_layer")


def test_guard_holds_back_every_kth_and_judges():
    guard = Guard(GuardConfig(holdout_every=2, holdout_size=3, min_holdout=2))
    x, y = torch.randn(10, 1, 4, 4), torch.arange(10) % 3
    tx, ty = guard.admit(x, y)
    assert guard.holdout_size == 3 and len(ty) == 7  # 5 held back, 2 of them pushed out to training
    assert guard.judge((0.5, 0.2), (0.5, 0.2)) and not guard.judge((0.5, 0.2), (0.6, 0.2))
    assert (guard.accepted, guard.rolled_back) == (1, 1)
    loss, err = guard.evaluate(bn_model())
    assert loss > 0 and 0 <= err <= 1 and guard.ready
    assert not Guard(GuardConfig(min_holdout=50)).ready and Guard().evaluate(bn_model()) is None


def test_norm_stats_folding_many_forwards_at_once_equals_one_at_a_time():
    """observe() after 30 forwards gives what observe() after each would (the EMA is per sample)."""
    one, many = bn_model(), bn_model()
    a, b = NormStatsAdapter(one, momentum=0.05), NormStatsAdapter(many, momentum=0.05)
    a.activate()
    b.activate()
    x = torch.randn(30, 1, 4, 4) * 2 + 1
    with torch.no_grad():
        for i in range(0, 30, 3):
            with a.recording():
                one(x[i:i + 3])
            a.observe()
            with b.recording():
                many(x[i:i + 3])
        b.observe()
    # sequentially, a batch of 3 folds as 3 samples: the exact per-sample EMA of the batched path
    ref = bn_model()
    c = NormStatsAdapter(ref, momentum=0.05)
    c.activate()
    with torch.no_grad():
        for i in range(30):
            with c.recording():
                ref(x[i:i + 1])
            c.observe()
    assert torch.allclose(many[1].running_mean, ref[1].running_mean, atol=1e-5)
    assert torch.allclose(many[1].running_var, ref[1].running_var, atol=1e-5)
    assert torch.allclose(one[1].running_mean, ref[1].running_mean, atol=1e-5)


def test_norm_stats_pending_forwards_are_bounded():
    model = bn_model()
    ad = NormStatsAdapter(model, max_pending=4)
    ad.activate()
    with torch.no_grad():
        for _ in range(10):
            with ad.recording():
                model(torch.randn(2, 1, 4, 4))
    assert len(ad._captured[0]) == 4
    ad.observe()
    assert ad.status()["samples"] == 8 and not ad._captured[0]
