"""Learning parts: replay buffer, gradient learner, Bayesian last layer, guard, quarantine."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfheal_core.config import GuardConfig, LearnConfig
from selfheal_core.guard import Guard
from selfheal_core.learn import BayesianLastLayer, GradientLearner, ReplayBuffer, select_parameters
from selfheal_core.quarantine import Quarantine
from selfheal_core.task import Task, TaskKind

CLS3 = Task(TaskKind.CLASSIFICATION, 3)


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 16, 3)).eval()


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


def test_replay_buffer_holds_regression_targets():
    buf = ReplayBuffer(4, 2)
    buf.add(torch.randn(6, 3), torch.randn(6, 2))
    x, y = buf.sample(5)
    assert y.shape == (5, 2) and y.dtype == torch.float32


def test_gradient_learner_changes_only_chosen_parameters_and_learns():
    model = bn_model()
    before = copy.deepcopy(model.state_dict())
    learner = GradientLearner(model, LearnConfig(params="last_layer", lr=0.05, steps=20, update_every=16), CLS3, "4")
    assert set(learner.params) == {"4.weight", "4.bias"}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 4, 4, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()  # learnable from the features
    loss0 = F.cross_entropy(model(x), y).item()
    assert learner.add(x, y)
    learner.step()
    assert F.cross_entropy(model(x), y).item() < loss0
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"4.weight", "4.bias"}
    learner.reset()
    assert all(torch.equal(after[k], before[k]) for k in after)


@pytest.mark.parametrize("newest", [0.0, 0.75, 1.0])
def test_minibatch_fractions_may_leave_no_uniform_share(newest):
    """reference_fraction + newest_fraction == 1 is allowed: the minibatch is theirs alone."""
    model = bn_model()
    config = LearnConfig(params="last_layer", steps=2, update_every=4, newest_fraction=newest,
                         reference_fraction=1.0 - newest, batch_size=8)
    learner = GradientLearner(model, config, CLS3, "4", reference=(torch.randn(10, 1, 4, 4), torch.randint(0, 3, (10,))))
    assert learner.add(torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]))
    learner.step()
    parts = learner._minibatch(torch.device("cpu"))
    assert sum(len(x) for x, _, _ in parts) == 8 and all(x.shape[1:] == (1, 4, 4) for x, _, _ in parts)
    assert sum(len(y) for _, y, ref in parts if ref) == round(8 * (1.0 - newest))


def test_gradient_learner_regression_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 1)).eval()
    task = Task(TaskKind.REGRESSION, 1)
    learner = GradientLearner(model, LearnConfig(lr=0.01, steps=50, min_steps=50, update_every=8, anchor=0.0),
                              task, "2")
    x = torch.randn(64, 3)
    y = (x[:, :1] * 3 + 1)
    loss0 = F.mse_loss(model(x), y).item()
    learner.add(x, y)
    learner.step()
    assert F.mse_loss(model(x), y).item() < loss0 * 0.7


def test_steps_per_update_shrink_as_labels_per_update_grow():
    model = nn.Sequential(nn.Linear(3, 4)).eval()
    learner = GradientLearner(model, LearnConfig(steps=20, min_steps=5, update_every=2), CLS3, "0")
    assert [learner.steps_for(n) for n in (1, 2, 4, 8, 16, 1000)] == [20, 20, 10, 5, 5, 5]
    assert GradientLearner(model, LearnConfig(steps=3, min_steps=5), CLS3, "0").steps_for(100) == 3


def test_fewer_steps_are_longer_in_proportion():
    """An update of many labels takes min_steps steps at lr * steps / min_steps; one of few labels
    `steps` steps at lr."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).eval()
    learner = GradientLearner(model, LearnConfig(lr=1e-3, steps=20, min_steps=5, update_every=2), CLS3, "0")
    for labels, lr in ((64, 4e-3), (2, 1e-3)):
        learner.add(torch.randn(labels, 3), torch.randint(0, 4, (labels,)))
        learner.step()
        assert learner._opt.lr == pytest.approx(lr), labels


def test_the_learners_adam_is_torchs_to_the_bit():
    """selfheal_core.learn.adam.Adam (no torch._dynamo import) against torch.optim.Adam: the same
    weights after steps with a changed step size and a parameter left without a gradient."""
    from selfheal_core.learn.adam import Adam

    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    theirs = copy.deepcopy(ours)
    opt_ours, opt_theirs = Adam(ours.parameters(), lr=3e-3), torch.optim.Adam(theirs.parameters(), lr=3e-3)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for i in range(20):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if i % 5 == 3:
                model[3].bias.grad = None  # skipped this step: its own step count stays behind
        opt_ours.lr = 1e-3 if i >= 10 else 3e-3
        for group in opt_theirs.param_groups:
            group["lr"] = opt_ours.lr
        opt_ours.step()
        opt_theirs.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


def test_parameter_sets():
    assert set(select_parameters(bn_model(), "norm_and_last", "4")) == {"1.weight", "1.bias", "4.weight", "4.bias"}
    with pytest.raises(ValueError, match="needs an output nn.Linear"):
        select_parameters(nn.Sequential(nn.Conv2d(1, 1, 1)), "last_layer", None)
    assert len(select_parameters(nn.Sequential(nn.Conv2d(1, 1, 1)), "auto", None)) == 2, "auto without a head: all"


def test_a_part_of_the_weights_steps_at_partial_lr():
    """Norm affine and the last layer of a large model step at `partial_lr`; every weight at `lr`."""
    config = LearnConfig(lr=1e-3, partial_lr=1e-4)
    assert GradientLearner(bn_model(), replace(config, params="norm_and_last"), CLS3, "4").lr == 1e-4
    assert GradientLearner(bn_model(), replace(config, params="last_layer"), CLS3, "4").lr == 1e-4
    assert GradientLearner(bn_model(), replace(config, params="all"), CLS3, "4").lr == 1e-3
    learner = GradientLearner(bn_model(), replace(config, params="auto", auto_max_params=10), CLS3, "4")
    assert learner.lr == 1e-4 and learner._opt.lr == 1e-4


@pytest.mark.parametrize("kind, targets", [
    (TaskKind.CLASSIFICATION, lambda f: (f[:, 0] > 0).long() + (f[:, 1] > 1).long()),
    (TaskKind.BINARY, lambda f: (f[:, 0] > 0).long()),
    (TaskKind.REGRESSION, lambda f: f[:, :1] * 2 - f[:, 1:2]),
])
def test_bayes_layer_learns_per_task(kind, targets):
    torch.manual_seed(0)
    outputs = {TaskKind.CLASSIFICATION: 3, TaskKind.BINARY: 1, TaskKind.REGRESSION: 1}[kind]
    task = Task(kind, outputs)
    layer = nn.Linear(6, outputs)
    bayes = BayesianLastLayer(layer, task, prior_var=0.5, forgetting=1.0)
    feats = torch.randn(80, 6)
    y = targets(feats)
    with torch.no_grad():
        before = task.loss(layer(feats), y)
    for i in range(0, 80, 4):
        bayes.update(feats[i:i + 4], y[i:i + 4])
    with torch.no_grad():
        assert task.loss(layer(feats), y) < before * 0.7
    state = bayes.state_dict()
    bayes.reset()
    assert bayes.updates == 0
    bayes.load_state_dict(state)
    assert bayes.updates == 80


def test_bayes_layer_without_bias():
    layer = nn.Linear(4, 2, bias=False)
    BayesianLastLayer(layer, Task(TaskKind.CLASSIFICATION, 2)).update(torch.randn(3, 4), torch.tensor([0, 1, 1]))
    assert layer.bias is None


def test_guard_holds_back_every_kth_and_judges():
    guard = Guard(GuardConfig(holdout_every=2, holdout_size=3, min_holdout=2), CLS3)
    x, y = torch.randn(10, 1, 4, 4), torch.arange(10) % 3
    tx, ty = guard.admit(x, y)
    assert guard.holdout_size == 3 and len(ty) == 7  # 5 held back, 2 of them pushed out to training
    assert guard.judge((0.5, 0.2), (0.5, 0.2)) and not guard.judge((0.5, 0.2), (0.6, 0.2))
    assert (guard.accepted, guard.rolled_back) == (1, 1)
    loss, err, per = guard.evaluate(bn_model())
    assert loss > 0 and 0 <= err <= 1 and guard.ready and per.shape == (3,)
    # paired per-label losses: a rise within one standard error of the change is noise, beyond it harm
    noisy = (0.5, 0.2, torch.tensor([0.2, 0.5, 0.8])), (0.52, 0.2, torch.tensor([0.5, 0.3, 0.76]))
    agreed = (0.5, 0.2, torch.tensor([0.2, 0.5, 0.8])), (0.6, 0.2, torch.tensor([0.3, 0.6, 0.9]))
    lenient = Guard(GuardConfig(significance=1.0), CLS3)
    assert lenient.judge(*noisy) and not lenient.judge(*agreed)
    assert not guard.judge(*noisy), "the default (significance 0): any rise rolls back"
    other = Guard(GuardConfig(holdout_every=2, holdout_size=3, min_holdout=2), CLS3)
    other.load_state_dict(guard.state_dict())
    mine, theirs = guard.evaluate(bn_model()), other.evaluate(bn_model())
    assert mine[:2] == theirs[:2] and torch.equal(mine[2], theirs[2])
    assert not Guard(GuardConfig(min_holdout=20), CLS3).ready and Guard(GuardConfig(), CLS3).evaluate(bn_model()) is None
    # issue 28: judged without gradients and in forwards within the learner's activation budget (20
    # 224x224 images of holdout through a ResNet-18 with gradients held 1.3 GB); the same figures
    from selfheal_core.model_parts import ActivationBudget

    model, calls = bn_model(), []
    model.register_forward_hook(lambda _m, inp, _o: calls.append((len(inp[0]), torch.is_grad_enabled())))
    budget = ActivationBudget(model, 1)  # one input per forward
    chunked = guard.evaluate(model, budget=budget)
    assert all(n == 1 and not grad for n, grad in calls[1:]) and len(calls) == 1 + 3  # measured once, then 3
    assert abs(chunked[0] - mine[0]) < 1e-6 and torch.allclose(chunked[2], mine[2])


def test_activation_budget_measures_before_hooks_and_gives_widened_slices():
    """Measured on an example at construction, a budget's forwards fire no hook its owner adds
    later (a measuring forward inside the Bayesian check once switched that layer off), and its
    slices come at the dtype asked for, none larger than the budget allows."""
    from selfheal_core.model_parts import ActivationBudget, activation_bytes

    model = bn_model()
    x = torch.randn(10, 1, 4, 4)
    per_input = activation_bytes(model, x[:1])
    budget = ActivationBudget(model, 3 * per_input, example=x[:1].half())
    assert budget.per_input == per_input  # measured at construction, widened to the weights' dtype
    calls = []
    model.register_forward_hook(lambda _m, inp, _o: calls.append(len(inp[0])))
    slices = list(budget.batches(x.half(), torch.float32))
    assert [len(b) for b in slices] == [3, 3, 3, 1] and all(b.dtype == torch.float32 for b in slices)
    assert torch.equal(torch.cat(slices), x.half().float()) and not calls, "slicing runs no forward"
    assert [len(b) for b in ActivationBudget(model, 10 ** 12, cap=4).batches(x)] == [4, 4, 2]


def screen_all(q, pairs, conf=0.99, drifted=False):
    served = torch.tensor([s for s, _ in pairs])
    given = torch.tensor([g for _, g in pairs])
    return q.screen(served, given, torch.full((len(pairs),), conf), drifted)


def test_quarantine_catches_a_burst_into_one_class_from_many():
    q = Quarantine(GuardConfig())
    honest = [(k % 10, k % 10) for k in range(100)]
    assert not screen_all(q, honest).any()
    attack = [(k % 9 if k % 9 != 7 else 8, 7) for k in range(60)]  # confident inputs of 8 classes, all called 7
    held = screen_all(q, attack)
    assert held[20:].all() and q.status()["active"] and q.status()["classes"] == [7]
    assert q.quarantined > 0
    other = Quarantine(GuardConfig())
    other.load_state_dict(q.state_dict())
    assert other.status() == q.status()


def test_concept_change_is_learned_after_corroboration_and_noise_is_held():
    q = Quarantine(GuardConfig(corroborate=3))
    swap = screen_all(q, [(1, 7), (7, 1)] * 10)
    assert swap[:4].all() and not swap[4:].any() and not q.status()["active"]
    q = Quarantine(GuardConfig(corroborate=3))
    noise = [(k % 10, (k * 3 + 1) % 10) for k in range(10)]  # ten different pairs
    assert screen_all(q, noise).all()
    assert not screen_all(q, noise, conf=0.5).any(), "unsure predictions are never held"
    assert not screen_all(Quarantine(GuardConfig()), noise, drifted=True).any(), "inputs drifted: learn"


def test_quarantine_window_is_bounded_and_counts_stay_exact():
    q = Quarantine(GuardConfig(quarantine_window=50))
    pairs = [(k % 10, (k + 1) % 10) for k in range(500)]
    screen_all(q, pairs)
    assert q.status()["window"] == 50 and q.status()["confident_disagreements"] == 50
    assert sum(q._pairs.values()) == 50


def test_classes_whose_meaning_moved_are_not_replayed_and_the_anchor_steps_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    ref = (torch.randn(30, 1, 4, 4), torch.arange(30) % 3)
    config = LearnConfig(batch_size=8, reference_fraction=0.5, newest_fraction=0.0, steps=1, min_steps=1)
    learner = GradientLearner(model, config, CLS3, "1", reference=ref)
    learner.add(torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    learner.concept_moved({1})
    for _ in range(20):
        (_, fed, _), (_, ref_y, is_ref) = learner._minibatch(torch.device("cpu"))
        assert is_ref and len(fed) == len(ref_y) == 4 and 1 not in ref_y.tolist()  # no class-1 reference row
    learner.concept_moved({0, 1, 2})
    parts = learner._minibatch(torch.device("cpu"))
    assert len(parts) == 1 and len(parts[0][1]) == 8 and not parts[0][2]  # every class moved: all feedback
    learner.reset()
    assert learner._moved == frozenset()


def test_replay_keeps_fewer_large_inputs_within_its_byte_budget():
    """Issue 28: 512 pairs of 3x224x224 inputs are 308 MB; the buffer keeps what fits its bytes,
    in the configured recent / reservoir proportion, and still keeps the newest."""
    from selfheal_core.learn.replay import ReplayBuffer

    pair = 3 * 64 * 64 * 4 + 8
    buf = ReplayBuffer(256, 256, max_bytes=40 * pair)
    for i in range(30):
        buf.add(torch.full((4, 3, 64, 64), float(i)), torch.full((4,), i))
    assert len(buf) <= 40 and buf.recent_size == 20 and buf.reservoir_size == 20
    x, y = buf.newest(1)
    assert int(y[0]) == 29
    small = ReplayBuffer(256, 256, max_bytes=40 * pair)
    small.add(torch.zeros(600, 4), torch.zeros(600))
    assert small.recent_size == 256 and len(small) == 512  # small inputs: the configured sizes


def test_replay_keeps_large_inputs_at_half_precision_and_gives_them_back_as_they_came():
    """Issue 28: a 224x224 ResNet's learner held 128 MB of replayed images in float32. Large float
    inputs are kept in float16 (half the bytes, the same pairs within the budget) and sampled at
    float32 within float16's rounding; an input float16 cannot hold stays exact; small inputs stay
    exact; a saved buffer keeps the compact inputs and restores the dtype they came in."""
    from selfheal_core.learn.compact import HALF_FROM_BYTES
    from selfheal_core.learn.replay import ReplayBuffer

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 96, 96, generator=gen)  # 110 kB a row
    assert x[0].numel() * 4 >= HALF_FROM_BYTES
    x[5, 0, 0, 0] = 1e6  # beyond float16: this pair stays float32
    pair = x[0].numel() * 4 + 8
    buf = ReplayBuffer(6, 2, max_bytes=8 * pair)
    buf.add(x, torch.arange(6))
    tight = ReplayBuffer(6, 2, max_bytes=6 * pair)
    tight.add(x, torch.arange(6))
    assert (tight.recent_size, tight.reservoir_size) == (4, 2)  # budgeted at float32: as many pairs as before
    kept = [xi for xi, _ in list(buf._recent) + buf._reservoir]
    assert sum(xi.dtype == torch.float16 for xi in kept) == 5 and sum(xi.dtype == torch.float32 for xi in kept) == 1
    assert sum(xi.numel() * xi.element_size() for xi in kept) < 0.6 * 6 * x[0].numel() * 4
    got, y = buf.newest(6)
    assert got.dtype == torch.float32 and torch.equal(y, torch.arange(6))
    assert torch.allclose(got[:5], x[:5], rtol=1e-3, atol=1e-4) and torch.equal(got[5], x[5])
    state = buf.state_dict()
    assert [xi.dtype for xi in state["recent_x"]] == [torch.float16] * 5 + [torch.float32]  # as kept, no copy
    assert state["x_dtype"] == "float32"
    again = ReplayBuffer(6, 2, max_bytes=8 * pair)
    again.load_state_dict(state)
    assert torch.equal(again.newest(6)[0], got) and again._recent[0][0].dtype == torch.float16
    whole = ReplayBuffer(4, 4, max_bytes=6 * pair)
    whole.add(x[:4], torch.arange(4))
    saved = whole.state_dict()
    assert all(xi.dtype == torch.float16 for xi in saved["recent_x"])  # saved compact
    old = {k: v for k, v in saved.items() if k != "x_dtype"}
    old["recent_x"] = x[:4].clone()  # saved before inputs were compacted: float32, no x_dtype
    restored = ReplayBuffer(4, 4, max_bytes=6 * pair)
    restored.load_state_dict(old)
    assert restored.newest(4)[0].dtype == torch.float32 and restored._recent[0][0].dtype == torch.float16
    small = ReplayBuffer(4, 4)
    small.add(torch.randn(3, 20), torch.arange(3))
    assert small._recent[0][0].dtype == torch.float32  # small inputs stay exact


def test_images_decoded_from_8_bits_are_kept_as_their_bytes_and_read_back_bit_for_bit():
    """Issue 28: a 224x224 learner's replay, holdout and reference are images decoded from 8 bits
    (k / 255, as PIL or ToTensor give them). Kept as their bytes (a quarter of float32, half of
    float16) they read back exactly; one value off the 255 levels keeps float16."""
    import numpy as np

    from selfheal_core.config import GuardConfig
    from selfheal_core.guard import Guard
    from selfheal_core.learn.compact import compact, widen
    from selfheal_core.learn.replay import ReplayBuffer
    from selfheal_core.task import Task

    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, (5, 3, 96, 96))
    x = torch.from_numpy(levels.astype(np.float32) / 255)  # as a handler decodes
    kept = compact(x)
    assert kept.dtype == torch.uint8 and torch.equal(widen(kept, torch.float32).view(torch.int32), x.view(torch.int32))
    x64 = torch.from_numpy(levels / 255)
    assert torch.equal(widen(compact(x64), torch.float64), x64) and compact(x64).dtype == torch.uint8
    assert compact(x.double()).dtype == torch.float16  # float32's k / 255 widened is no float64 level
    off = x.clone()
    off[0, 0, 0, 0] = 0.5  # not k / 255
    assert compact(off).dtype == torch.float16 and compact(x[1:]).dtype == torch.uint8
    assert compact(-x).dtype == torch.float16  # negative: not an 8-bit image's levels

    buf = ReplayBuffer(5, 0, max_bytes=10 * 2 ** 20)
    buf.add(x, torch.arange(5))
    assert all(xi.dtype == torch.uint8 for xi, _ in buf._recent)
    assert torch.equal(buf.newest(5)[0], x)
    again = ReplayBuffer(5, 0, max_bytes=10 * 2 ** 20)
    again.load_state_dict(buf.state_dict())
    assert torch.equal(again.newest(5)[0], x) and again._recent[0][0].dtype == torch.uint8

    guard = Guard(GuardConfig(holdout_every=1, holdout_size=2, min_holdout=1), Task.from_outputs("classification", torch.zeros(1, 10)))
    train_x, _ = guard.admit(torch.cat([x[:3], off[:1]]), torch.arange(4))
    assert torch.equal(train_x, x[:2])  # pushed out of the holdout: back at float32, exact
    assert [h[0].dtype for h in guard._holdout] == [torch.uint8, torch.float16]
    state = guard.state_dict()
    assert state["_holdout_state"]["x"].dtype == torch.float32 and torch.equal(state["_holdout_state"]["x"][0], x[2])
    restored = Guard(GuardConfig(holdout_every=1, holdout_size=2, min_holdout=1), Task.from_outputs("classification", torch.zeros(1, 10)))
    restored.load_state_dict(state)
    assert restored._holdout[0][0].dtype == torch.uint8 and torch.equal(restored._input(0), x[2])


def test_a_minibatch_too_large_for_step_bytes_runs_in_chunks_to_the_same_step():
    """Issue 28: a ResNet-18 at 224x224 keeps ~40 MB of activations per input for its backward
    (1.7 GB of learner at 32 per minibatch). Within `step_bytes` the minibatch runs in chunks with
    gradients accumulated: the same update, in bounded memory."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 4, 4, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    models = []
    for step_bytes in (1 << 30, 1_000):  # everything at once; a few inputs per chunk
        model = bn_model()
        learner = GradientLearner(model, LearnConfig(params="all", steps=5, update_every=16, step_bytes=step_bytes),
                                  CLS3, "4", reference=(torch.randn(10, 1, 4, 4, generator=torch.Generator().manual_seed(1)),
                                                        torch.randint(0, 3, (10,))))
        learner.add(x, y)
        learner.step()
        models.append((model, learner.budget.rows(x)))
    (whole, n_whole), (chunked, n_chunked) = models
    assert n_whole == 64 and 1 <= n_chunked < 8
    for (k, a), b in zip(whole.state_dict().items(), chunked.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


def test_activation_bytes_of_a_torchscript_model_are_bounded_without_hooks():
    """TorchScript takes no forward hooks: measuring them crashed the learner of a scripted model."""
    from selfheal_core.model_parts import activation_bytes

    scripted = torch.jit.trace(bn_model(), torch.randn(2, 1, 4, 4))
    assert activation_bytes(scripted, torch.randn(1, 1, 4, 4)) == 16 * 16 * 4
    assert activation_bytes(bn_model(), torch.randn(1, 1, 4, 4)) > 0


def test_source_check_calls_consistent_harm_and_not_noise():
    from selfheal_core.source_check import SourceCheck
    check = SourceCheck(window=32, significance=3.0, min_labels=8)
    g = torch.Generator().manual_seed(0)
    noise = [check.observe(torch.randn(4, generator=g), torch.randn(4, generator=g)) for _ in range(50)]
    assert not any(noise) and check.fallbacks == 0
    assert not check.observe(torch.full((7,), 1.0), torch.zeros(7))  # fewer than min_labels of harm so far
    assert check.observe(torch.full((8,), 1.0) + 0.1 * torch.randn(8, generator=g), torch.zeros(8))
    assert check.fallbacks == 1 and check.status()["labels"] == 0  # the window restarts after a verdict
    copy_ = SourceCheck(window=32, significance=3.0, min_labels=8)
    check.observe(torch.ones(3), torch.zeros(3))
    copy_.load_state_dict(check.state_dict())
    assert copy_.status() == check.status()
