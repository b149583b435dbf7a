"""ServingModel: any model and task, monitor-only where nothing can change, no hooks left behind."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from selfheal_core import HealConfig, ServingModel
from selfheal_core.config import MonitorConfig
from selfheal_core.learner import Learner


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def mlp(out: int = 3, norm: type | None = nn.LayerNorm) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(5, 16)] + ([norm(16)] if norm else []) + [nn.ReLU(), nn.Linear(16, out)]
    return nn.Sequential(*layers).eval()


FAST = HealConfig(monitor=MonitorConfig(calibration_paths=50, expected_run_time=2_000))


def test_a_failed_construction_leaves_the_model_untouched_and_usable():
    model = mlp(out=1)
    with pytest.raises(ValueError, match="task: binary"):
        ServingModel(model, torch.randn(100, 5), FAST, "classification")
    assert hooks(model) == 0
    copy.deepcopy(model)  # no hook holding a server object: copies and pickles as before
    serving = ServingModel(model, torch.randn(100, 5), FAST, "binary")
    assert serving.task.num_classes == 2 and hooks(model) == 1
    serving.close()
    assert hooks(model) == 0


def test_reference_problems_are_named():
    with pytest.raises(ValueError, match="at least 30"):
        ServingModel(mlp(), torch.randn(10, 5), FAST)
    with pytest.raises(ValueError, match="NaN"):
        ServingModel(mlp(), torch.full((40, 5), float("nan")), FAST)


def test_layernorm_and_norm_free_models_adapt_their_inputs_and_nothing_to_adapt_is_said():
    available = ServingModel(mlp(), torch.randn(100, 5), FAST).status()["label_free"]["available"]
    assert available == "input_stats, norm_affine, prior"
    plain = ServingModel(mlp(norm=None), torch.randn(100, 5), HealConfig.from_dict(
        {"correct": {"prior": False}, "monitor": {"calibration_paths": 50}}))
    assert plain.status()["label_free"]["available"] == "input_stats"
    nothing = ServingModel(mlp(norm=None), torch.randn(100, 5), HealConfig.from_dict(
        {"correct": {"prior": False, "input_stats": False, "input_polarity": False},
         "monitor": {"calibration_paths": 50}}))
    assert nothing.status()["label_free"]["available"] == "nothing to adapt; labelled feedback only"


def test_torchscript_is_served_monitor_only_and_still_watched():
    scripted = torch.jit.script(mlp(norm=nn.BatchNorm1d))
    g = torch.Generator().manual_seed(0)
    serving = ServingModel(scripted, torch.randn(300, 5, generator=g), FAST)
    st = serving.status()
    assert st["mode"] == "monitor" and st["model"]["scripted"] and st["label_free"]["available"].startswith("off")
    assert set(st["drift"]["scores"]) == {"confidence", "class_shift", "feature_shift"}, "features: pooled inputs"
    for _ in range(20):
        serving.predict(torch.randn(16, 5, generator=g) * 4 + 3)
    serving.drain()
    assert serving.status()["drift"]["detected"]


def test_regression_model_is_monitored_on_outputs_and_features():
    g = torch.Generator().manual_seed(0)
    model = mlp(out=2, norm=nn.BatchNorm1d)
    serving = ServingModel(model, torch.randn(300, 5, generator=g), FAST, "regression",
                           reference_targets=torch.randn(300, 2, generator=g))
    st = serving.status()
    assert st["task"] == "regression" and set(st["drift"]["scores"]) == {"feature_shift", "output_shift"}
    assert st["label_free"]["available"] == "input_polarity, norm_stats"
    for _ in range(20):
        serving.predict(torch.randn(16, 5, generator=g) + 2)
    serving.drain()
    st = serving.status()
    assert st["drift"]["detected"] and st["label_free"]["norm_stats"]["active"], "a feature shift adapts statistics"


def test_monitor_only_config_corrects_nothing():
    model = mlp(norm=nn.BatchNorm1d)
    before = copy.deepcopy(model.state_dict())
    serving = ServingModel(model, torch.randn(100, 5), HealConfig(adapt=False, monitor=FAST.monitor))
    for _ in range(20):
        serving.predict(torch.randn(16, 5) * 5)
    serving.drain()
    assert serving.status()["drift"]["detected"] and serving.corrector is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


REF = torch.randn(100, 5, generator=torch.Generator().manual_seed(5))


def moved_learner(model) -> Learner:
    """A learner over a copy of `model` whose weights all moved (as an update moves them), on the
    workers' reference (REF)."""
    learner = Learner(copy.deepcopy(model), REF, FAST, reference_targets=torch.randint(0, 3, (100,)))
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(0.1)
    return learner


def test_a_published_version_is_applied_by_the_serving_thread_only():
    model = mlp()
    serving = ServingModel(model, REF, FAST)
    learner = moved_learner(model)
    x = torch.randn(4, 5)
    before = serving.predict(x)
    serving.install(learner.published(7))
    assert serving.version == 0 and serving.pending_version == 7, "prepared, not yet applied"
    after = serving.predict(x)
    assert serving.version == 7 and not torch.allclose(after, before)
    with torch.no_grad():
        assert torch.allclose(after, learner.model(x), atol=1e-6)


def test_a_version_with_the_weights_served_already_is_not_re_read(monkeypatch):
    """A learner publishes after absorbing labels even when its update was rolled back (most are):
    a worker then re-installed its detectors' reference statistics and copied every weight for
    nothing. The same weights and reference under a new number only move the number."""
    model = mlp()
    serving = ServingModel(model, REF, FAST)
    learner = moved_learner(model)
    fits = []
    fit = serving.monitor.install_rebase
    monkeypatch.setattr(serving.monitor, "install_rebase", lambda values: fits.append(1) or fit(values))
    x = torch.randn(4, 5)
    serving.install(learner.published(6))
    serving.install(learner.published(7))  # the same weights, while 6 still waits for the serving thread
    first = serving.predict(x)
    with torch.no_grad():
        assert torch.allclose(first, learner.model(x), atol=1e-6), "6's weights were applied"
    serving.install(learner.published(8))
    assert serving.pending_version == 8 and len(fits) == 1, "the same weights: nothing re-read"
    assert torch.equal(serving.predict(x), first) and serving.version == 8
    with torch.no_grad():
        list(learner.model.parameters())[-1].add_(0.5)  # the output layer's bias
    learner._refit_reference()
    serving.install(learner.published(9))
    assert len(fits) == 2 and not torch.allclose(serving.predict(x), first) and serving.version == 9
    assert serving.counters["rebase_refused"] == 0, "the learner fitted along the worker's axes"


def test_bad_inputs_are_refused_with_the_reason():
    serving = ServingModel(mlp(), torch.randn(100, 5), FAST)
    for bad, words in [(torch.zeros(2, 4), "shape"), (torch.zeros(0, 5), "empty"),
                       (torch.full((1, 5), float("inf")), "NaN or inf"), ([[0.0] * 5], "tensor"),
                       (torch.zeros(2000, 5), "exceeds")]:
        with pytest.raises(ValueError, match=words):
            serving.predict(bad)
    assert serving.counters["predictions"] == 0
