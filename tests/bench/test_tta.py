"""The published test-time adaptation peers (selfheal_bench/tta.py) on tiny models: they run, and adapt
only what they say they do."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from selfheal_bench.tta import PEERS, Roid


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 4)).eval()


def ln_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("make", [bn_model, ln_model])
@pytest.mark.parametrize("name", sorted(PEERS))
@pytest.mark.parametrize("batch", [16, 1])
def test_peer_predicts_and_moves_only_norm_parameters(make, name, batch):
    model = make()
    source = copy.deepcopy(model.state_dict())
    torch.manual_seed(1)
    method = PEERS[name](model, reference=torch.rand(32, 1, 4, 4))
    x = torch.rand(64, 1, 4, 4) * 3 + 1
    for i in range(0, len(x), batch):
        pred = method(x[i:i + batch])
        assert pred.shape == (len(x[i:i + batch]),) and pred.dtype == torch.long
    linears = [k for k in source if k.endswith("weight") and source[k].dim() >= 2]
    assert all(torch.equal(model.state_dict()[k], source[k]) for k in linears), "only norm affine parameters move"
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_roid_stays_near_the_source_by_weight_ensembling():
    model = ln_model()
    source = {k: v.clone() for k, v in model.state_dict().items()}
    method = Roid(model, momentum_src=0.5)
    for _ in range(20):
        method(torch.rand(16, 1, 4, 4) * 5)
    moved = max(float((model.state_dict()[k] - source[k]).abs().max()) for k in ("2.weight", "2.bias"))
    assert 0 < moved < 0.01
