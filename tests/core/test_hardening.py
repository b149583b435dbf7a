"""Issue 26: no request changes what others are served except through guarded paths; config is
checked whole; the prediction queue has one owner and a byte budget; hooks go on on the serving thread."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from selfheal_core import HealConfig, ServingModel
from selfheal_core.config import CorrectConfig, MonitorConfig
from selfheal_core.estimate import ATYPICAL_GATE
from selfheal_core.plausible import PlausibleRange
from selfheal_core.prediction_queue import PredictionQueue


def bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3)).eval()


def config(**top) -> HealConfig:
    return HealConfig(monitor=MonitorConfig(calibration_paths=50, expected_run_time=2_000),
                      correct=CorrectConfig(when="always"), **top)


def reference() -> torch.Tensor:
    return torch.rand(200, 1, 6, 6, generator=torch.Generator().manual_seed(1))


def clean(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


@pytest.mark.parametrize("value", [1e6, 1e18, 3e38])
def test_one_request_of_huge_inputs_changes_nothing_others_are_served(value):
    """Red team case A: 8 inputs of huge pixels after adaptation started made every later answer NaN."""
    attacked, control = ServingModel(bn_cnn(), reference(), config()), ServingModel(bn_cnn(), reference(), config())
    for serving in (attacked, control):
        for i in range(5):
            serving.predict(clean(16, i))
    out = attacked.predict(torch.full((8, 1, 6, 6), value))
    assert out.shape == (8, 3), "the request itself is answered"
    for i in range(5, 12):
        a, c = attacked.predict(clean(16, i)), control.predict(clean(16, i))
        assert torch.isfinite(a).all()
        assert torch.equal(a, c), "the huge request reached the statistics others are served with"
    assert attacked.counters["implausible"] == 8
    attacked.drain()
    accuracy = attacked.status()["accuracy"]
    assert not accuracy["trusted"] and "outside the reference" in accuracy["untrusted_reason"]


def test_a_gain_drift_is_plausible_and_still_adapted_on():
    rng = PlausibleRange(reference(), 3.0)
    assert rng.check(reference() * 1.6).all() and rng.check(reference() * 0.2 + 0.5).all()
    noisy = (reference() + 0.5 * torch.randn(200, 1, 6, 6)).clamp(0, 1)
    assert rng.check(noisy).all()
    assert not rng.check(torch.full((1, 1, 6, 6), 1e6)).any()
    assert not rng.check(torch.full((1, 1, 6, 6), float("nan"))).any()


def test_statistics_that_go_nonfinite_are_reset_at_once_and_counted():
    serving = ServingModel(bn_cnn(), reference(), config())
    serving.predict(clean(16, 0))
    norm = serving.corrector.norm_stats()
    norm._ema = [torch.full_like(e, float("inf")) for e in norm._ema]  # however it got there
    serving.predict(clean(200, 1))  # drains: observe finds the statistics non-finite
    status = serving.status()["label_free"]
    assert status["nonfinite_resets"] == 1 and norm.finite() and norm.active
    assert torch.isfinite(serving.predict(clean(4, 2))).all()


def test_nan_answers_are_not_observed_and_the_estimate_says_it_cannot_be_trusted():
    model = bn_cnn()
    serving = ServingModel(model, reference(), config())
    serving.predict(clean(32, 0))
    serving.drain()
    assert serving.status()["accuracy"]["trusted"]
    with torch.no_grad():
        model[4].bias[0] = float("nan")  # a broken model, not an input
    serving.predict(clean(8, 1))
    serving.drain()
    accuracy = serving.status()["accuracy"]
    assert serving.counters["nonfinite_outputs"] == 8
    assert not accuracy["trusted"] and "NaN" in accuracy["untrusted_reason"]


def test_hooks_go_on_when_the_serving_thread_syncs_not_when_another_thread_activates():
    model = bn_cnn()
    serving = ServingModel(model, reference(), HealConfig(monitor=MonitorConfig(calibration_paths=50)))
    norm = serving.corrector.norm_stats()
    before = sum(len(m._forward_pre_hooks) for m in model.modules())
    worker = threading.Thread(target=norm.activate)
    worker.start()
    worker.join()
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == before
    serving.sync()
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) > before


def test_the_prediction_queue_sheds_the_oldest_beyond_its_byte_budget_and_counts_samples():
    serving = ServingModel(bn_cnn(), reference(), config(max_queued_bytes=4_000))
    for i in range(10):
        serving.predict(clean(4, i), defer=True)
    status = serving.status()
    assert status["queue"]["bytes"] <= 4_000 and status["counters"]["shed"] > 0
    assert status["counters"]["shed"] % 4 == 0, "shed counts predictions, not forwards"
    q = PredictionQueue(10, 10**6)
    threads = [threading.Thread(target=lambda: [q.put(i, 1, 1) for i in range(2000)]) for _ in range(2)]
    taken = []
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        taken += q.take_all()
    taken += q.take_all()
    assert len(taken) + q.shed_samples == 4000 and q.samples == 0


@pytest.mark.parametrize("bad, message", [
    ({"observe_every": 9000}, "observe_every.*max_queued"),
    ({"guard": {"min_holdout": 30}}, "min_holdout.*holdout_size"),
    ({"learn": {"lr": float("inf")}}, "lr must be a finite number"),
    ({"learn": {"steps": 2.5}}, "steps must be an integer"),
    ({"max_batch": "abc"}, "max_batch must be an integer"),
    ({"adapt": 1}, "adapt must be true or false"),
    ({"monitor": {"nope": 1}}, "unknown MonitorConfig keys.*valid"),
])
def test_config_is_checked_whole_and_names_the_fields(bad, message):
    with pytest.raises(ValueError, match=message):
        HealConfig.from_dict(bad)


def test_a_shift_that_makes_the_model_surer_is_not_trusted():
    """A dead or saturated sensor channel made the live estimate read 1.000 at 28% accuracy: a
    confidence-based estimate cannot see errors the model is sure of. When the inputs shifted and
    the model is surer than on its reference, the estimate says it cannot be trusted."""
    torch.manual_seed(3)
    ref = torch.randn(400, 4)
    labels = (ref[:, 0] + 0.5 * ref[:, 1] + 0.8 * torch.randn(400) > 0).long()  # ~80% accurate
    model = nn.Sequential(nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-1.0, -0.5, 0, 0], [1.0, 0.5, 0, 0]]))
        model[0].bias.zero_()
    monitor_only = HealConfig(monitor=MonitorConfig(calibration_paths=50, expected_run_time=2_000), adapt=False)
    serving = ServingModel(model, ref, monitor_only, reference_targets=labels)
    serving.predict(torch.randn(400, 4))
    serving.drain()
    assert serving.status()["accuracy"]["trusted"], "in distribution: trusted"
    stuck = torch.randn(3000, 4)
    stuck[:, 1] = 3.0  # a channel stuck high: every answer is the same, and sure
    for i in range(0, 3000, 100):
        serving.predict(stuck[i:i + 100])
    serving.drain()
    status = serving.status()
    accuracy = status["accuracy"]
    assert status["drift"]["detected"] and not accuracy["trusted"] and "surer" in accuracy["untrusted_reason"]
    # every answer is one class, on inputs unlike the reference: the estimate is no higher than
    # the classes allow (about a half), where confidence alone said 1.000
    assert accuracy["atypical_share"] >= ATYPICAL_GATE and accuracy["estimate"] <= accuracy["class_bound"] < 0.6


def test_a_version_of_another_architecture_is_refused_and_serving_goes_on():
    """An old snapshot directory of another model crashed the worker at start, in a loop (issue 26
    K): install copied weights of the wrong shape on the serving thread."""
    from selfheal_core.serving import Published

    serving = ServingModel(bn_cnn(), reference(), config())
    before = serving.predict(clean(4, 0))
    other = {"0.weight": torch.zeros(8, 1, 3, 3)}  # another architecture's first convolution
    with pytest.raises(ValueError, match="0.weight"):
        serving.install(Published(version=7, weights=other))
    with pytest.raises(ValueError, match="does not"):
        serving.install(Published(version=7, weights={"head.weight": torch.zeros(3)}))
    assert serving.pending_version == 0
    assert torch.equal(serving.predict(clean(4, 0)), before) and serving.version == 0
