"""Label-free correctors: entropy adapter, prior correction, their wiring and collapse reset."""
from __future__ import annotations

import copy

import torch
from torch import nn

from selfheal_core.config import CorrectConfig
from selfheal_core.correct import EntropyAdapter, LabelFreeCorrector, PriorCorrector


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[3].weight.mul_(8)  # confident predictions: entropy minimisation only uses reliable samples
    return model


def test_entropy_adapter_trains_only_itself_and_resets_exactly():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    ad = EntropyAdapter(model[3], lr=0.05, step_every=8)
    x = torch.randn(64, 6) + 1.0
    with torch.no_grad():
        feats = model[:3](x)
        plain = model(x)
    ad.observe(feats)
    assert ad.status()["steps"] == 0, "inactive: nothing happens"
    ad.activate()
    for i in range(0, 64, 4):  # four samples per request, steps accumulate across requests
        ad.observe(feats[i:i + 4])
    assert ad.status()["steps"] == 8 and ad.status()["adapter_norm"] > 0
    with torch.no_grad():
        assert not torch.allclose(model(x), plain)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "model weights untouched"
    other = EntropyAdapter(mlp()[3])
    other.load_state_dict(ad.state_dict())
    assert other.status() == ad.status()
    ad.reset()
    with torch.no_grad():
        assert torch.equal(model(x), plain)


def test_prior_corrector_reverts_when_shift_ends():
    pc = PriorCorrector(torch.full((4,), 0.25), momentum=0.05, pseudo_count=0.01)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    for _ in range(40):
        pc.observe(skewed)
    assert pc.prior[0] > 0.6
    for _ in range(200):
        pc.observe(torch.full((8, 4), 0.25))
    assert abs(float(pc.prior[0]) - 0.25) < 0.05
    assert torch.equal(pc.adjust(torch.ones(2, 4)), torch.ones(2, 4)), "inactive: logits unchanged"


def test_label_free_corrector_activation_rules():
    model = mlp()
    ref_probs = torch.softmax(model(torch.randn(100, 6)), 1).detach()
    lf = LabelFreeCorrector(model, model[3], ref_probs, CorrectConfig(prior_quiet=50, entropy=True))
    probs = torch.full((10, 4), 0.25)
    feats = torch.randn(10, 16)
    assert lf.observe(probs, feats, ["class_shift"]) == ["prior"], "classes moved, model sure: label shift"
    assert lf.observe(probs, feats, ["confidence"]) == [], "within prior_quiet of a label-shift alarm"
    for _ in range(5):
        lf.observe(probs, feats, [])
    assert lf.observe(probs, feats, ["confidence"]) == ["entropy"], "no BatchNorm: no norm stats"
    assert not lf.prior.active, "a confidence alarm switches the prior correction off"
    assert lf.observe(probs, feats, ["class_shift"]) == [], "within prior_quiet of a confidence alarm"
    state = lf.state_dict()
    lf.reset()
    assert not lf.active
    lf.load_state_dict(state)
    assert lf.entropy.active
    both = LabelFreeCorrector(model, model[3], ref_probs, CorrectConfig(prior_quiet=50, entropy=True))
    assert both.observe(probs, feats, ["confidence", "class_shift"]) == ["entropy"], "input shift moves both"


def test_collapse_resets_adaptation():
    model = mlp()
    ref_probs = torch.softmax(torch.randn(200, 4, generator=torch.Generator().manual_seed(0)), 1)  # ~25% each
    lf = LabelFreeCorrector(model, model[3], ref_probs, CorrectConfig(collapse_window=50, entropy=True))
    lf.observe(torch.full((1, 4), 0.25), torch.randn(1, 16), ["confidence"])
    one_class = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(16, 1)
    for _ in range(20):
        lf.observe(one_class, torch.randn(16, 16), [])
    assert lf.collapses >= 1 and not lf.entropy.active
