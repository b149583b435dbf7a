"""Learner: the learning side alone, fed from a feedback log as the learner process feeds it."""
from __future__ import annotations

import copy
import dataclasses
import time

import pytest
import torch

from selfheal_bench.data import corrupt, resample
from selfheal_core import HealConfig, Learner
from selfheal_core.learner import published_from_snapshot
from selfheal_core.storage import FileSnapshotStore, SQLiteFeedbackLog, encode_target


def log_labels(log, x, y, served=None):
    return log.append(x, [encode_target(t) for t in y],
                      [None] * len(y) if served is None else [encode_target(s) for s in served],
                      [None] * len(y))


def test_learner_consumes_the_log_in_order_and_marks_rows(demo_model, reference, digits):
    x_ref, y_ref = reference
    _, _, x_te, y_te = digits
    x, y = resample(x_te, y_te, 60, seed=1)
    x = corrupt(x, "rotate", 4, seed=1)
    log = SQLiteFeedbackLog()
    log_labels(log, x, y)
    learner = Learner(copy.deepcopy(demo_model), x_ref, HealConfig(), reference_targets=y_ref)
    rows = next(log.entries(after=learner.absorbed, batch=40))
    learner.absorb_entries(rows, None, log)
    assert learner.absorbed == 40 and learner.update_due
    result = learner.update()
    assert result.updated or result.rolled_back
    statuses = log.stats()["by_status"]
    assert statuses.get("new") == 20 and sum(statuses.values()) == 60
    learner.absorb_entries(next(log.entries(after=learner.absorbed)), None, log)
    assert learner.absorbed == 60 and "new" not in log.stats()["by_status"]


def test_a_published_snapshot_resumes_the_learner_and_feeds_workers(demo_model, reference, digits, tmp_path):
    x_ref, y_ref = reference
    _, _, x_te, y_te = digits
    x, y = resample(x_te, y_te, 80, seed=2)
    x = corrupt(x, "rotate", 4, seed=2)
    store = FileSnapshotStore(tmp_path)
    learner = Learner(copy.deepcopy(demo_model), x_ref, HealConfig(), reference_targets=y_ref)
    t0 = time.time()
    for i in range(0, 80, 8):
        learner.absorb(x[i:i + 8], y[i:i + 8], seqs=list(range(i + 1, i + 9)), times=[t0] * 8)
        learner.update()
    state, meta, private = learner.snapshot()
    version = store.save(state, meta, private)
    learner.mark_published(version)
    delays = learner.status()["label_delay"]
    assert delays["labels"] == 80 and delays["p99_s"] >= delays["p50_s"] >= 0
    again = Learner(copy.deepcopy(demo_model), x_ref, HealConfig(), reference_targets=y_ref)
    loaded_state, loaded_meta = store.load_latest()
    assert "learner" not in loaded_state, "workers read the published record only: never the learner's state"
    again.load_state_dict(store.load_private(version)["learner"])
    assert again.absorbed == 80 and again.counters["feedback"] == 80
    with torch.no_grad():
        assert torch.equal(again.model(x), learner.model(x))
    published = published_from_snapshot(loaded_state, loaded_meta)
    changed = {k for k, v in learner.model.named_parameters() if not torch.equal(v, dict(demo_model.named_parameters())[k])}
    assert published.version == version and set(published.weights) == changed and changed  # what differs from the source
    # workers get the reference statistics fitted with these weights, a few KB; the view itself
    # (every reference input's features) is the learner's, in the private record
    rebase = published.rebase
    assert published.reference is None and rebase["confidence"].shape == rebase["predicted"].shape == (len(x_ref),)
    assert set(rebase["detectors"]) == {"confidence", "feature_shift"}
    assert rebase["points"].shape == (len(x_ref), HealConfig().monitor.feature_dims)  # the estimate's atypical check
    assert "reference" not in loaded_state and store.load_private(version)["reference"]["features"] is not None


def test_a_worker_installs_the_learners_reference_statistics_as_it_would_fit_them_itself(demo_model, reference,
                                                                                           digits):
    """Workers read a version's detector statistics fitted by the learner (a few KB), not the
    reference's features: installed, they equal what the worker fits from the learner's view. A
    learner on another reference fitted along other axes: refused and counted, weights served."""
    from selfheal_core.serving import Published, ServingModel

    x_ref, y_ref = reference
    _, _, x_te, y_te = digits
    x, y = resample(x_te, y_te, 160, seed=4)
    x = corrupt(x, "rotate", 4, seed=4)
    learner = Learner(copy.deepcopy(demo_model), x_ref, HealConfig(), reference_targets=y_ref)
    for i in range(0, 160, 16):
        learner.absorb(x[i:i + 16], y[i:i + 16])
        learner.update()
    published = learner.published(3)
    assert published.weights, "an update was accepted"
    serving = ServingModel(copy.deepcopy(demo_model), x_ref, HealConfig(), reference_targets=y_ref)
    expected = serving.monitor.fit_rebase(learner.reference_view())
    serving.install(published)
    serving.sync()
    assert serving.counters["rebase_refused"] == 0
    for name, values in expected.items():
        installed = serving.monitor.detectors[next(d for d in serving.monitor.detectors if d.value == name)]
        for key, value in values.items():
            got = installed.reference_state()[key]
            assert torch.allclose(got, value, atol=1e-8), (name, key)
    conf, pred = learner.reference_view().probs.max(1)
    assert abs(serving.estimator.reference_accuracy - float((pred == y_ref).double().mean())) < 1e-9
    # the reference's features through the new weights on the worker's own axes: what decides
    # which live inputs are unlike the reference (a version without them: no such check; a version
    # whose points do not fit the reference: refused whole)
    points = serving.monitor.project_features(learner.reference_view().features)
    assert torch.allclose(published.rebase["points"].double(), points, atol=1e-4)
    # another reference, other axes: the detector keeps its statistics, the weights are served
    other = Learner(copy.deepcopy(demo_model), x_te[:300], HealConfig(), reference_targets=y_te[:300])
    before = serving.monitor.detectors[next(d for d in serving.monitor.detectors if d.value == "feature_shift")]
    kept = before.reference_state()
    with torch.no_grad():
        head = dict(other.model.named_parameters())
        head[list(head)[-1]].add_(0.25)
    other._refit_reference()
    serving.install(other.published(4))
    serving.sync()
    assert serving.counters["rebase_refused"] == 1 and serving.version == 4
    assert all(torch.equal(kept[k], v) for k, v in before.reference_state().items())
    assert torch.equal(serving.model(x_ref[:5]), other.model(x_ref[:5]))
    bad = Published(version=5, weights={}, rebase={"confidence": torch.rand(7), "predicted": torch.zeros(7, dtype=torch.int32)})
    with pytest.raises(ValueError, match="reference"):  # confidences of another reference's size
        serving.install(bad)
    # a version's points decide which live inputs are unlike the reference; without them no such
    # check, and points that do not fit the reference refuse the version whole
    for _ in range(2):  # half a window
        serving.predict(x)
    serving.drain()
    assert serving.estimator.atypical_share() is not None
    bare = dataclasses.replace(published, version=6, rebase={k: v for k, v in published.rebase.items() if k != "points"})
    serving.install(bare)
    assert serving.estimator.atypical_share() is None
    bad = dataclasses.replace(published, version=7, rebase={**published.rebase, "points": points[:10].float()})
    with pytest.raises(ValueError, match="reference points"):
        serving.install(bad)


def test_a_monitor_only_learner_watches_errors_and_trains_nothing(demo_model, reference, digits):
    x_ref, y_ref = reference
    _, _, x_te, y_te = digits
    x, y = resample(x_te, y_te, 200, seed=3)
    x = corrupt(x, "rotate", 4, seed=3)
    before = copy.deepcopy(demo_model.state_dict())
    learner = Learner(demo_model, x_ref, HealConfig(adapt=False), reference_targets=y_ref)
    for i in range(0, 200, 20):
        learner.absorb(x[i:i + 20], y[i:i + 20])
        assert not learner.update_due and not learner.update().updated
    st = learner.status()
    assert st["errors"]["detected"] and "error_rate" in st["errors"]["firing"]
    assert "monitor-only" in st["learner"]["learning"]
    assert all(torch.equal(v, before[k]) for k, v in demo_model.state_dict().items())


def test_serving_statistics_reach_the_learner(demo_model, reference):
    x_ref, y_ref = reference
    learner = Learner(copy.deepcopy(demo_model), x_ref, HealConfig(), reference_targets=y_ref)
    bn = learner.parts.batchnorms[0]
    source = bn.running_mean.clone()
    moments = {"active": True, "mean": [torch.full_like(m.running_mean, 0.5) for m in learner.parts.batchnorms],
               "sq": [torch.full_like(m.running_mean, 1.25) for m in learner.parts.batchnorms]}
    learner.use_context({"norm": moments})
    assert torch.allclose(bn.running_mean, torch.full_like(source, 0.5)) and torch.allclose(
        bn.running_var, torch.ones_like(source))
    learner.use_context(None)
    assert torch.equal(bn.running_mean, source)


def test_labels_train_on_what_serving_gives_the_model(demo_model, reference, digits):
    """Serving un-mirrors mirrored inputs (its polarity fix) before the model sees them; labels on
    those inputs must train and be judged on what the model is given, never on the raw mirrored
    inputs (issue 27: trained on those, labels made the served error worse than no labels)."""
    x_ref, y_ref = reference
    _, _, x_te, y_te = digits
    x, y = resample(x_te, y_te, 400, seed=2)
    mirrored = 1.0 - x
    shape = (1,) + tuple(x.shape[1:])
    context = {"input": {"scale": torch.full(shape, -1.0), "shift": torch.ones(shape)}}
    learner = Learner(copy.deepcopy(demo_model), x_ref, HealConfig(), reference_targets=y_ref)
    learner.use_context(context)
    assert torch.allclose(learner.as_served(mirrored), x)
    given: list[torch.Tensor] = []  # every input the model is given while it learns
    learner.model.register_forward_pre_hook(lambda _m, args: given.append(args[0].detach().reshape(len(args[0]), -1)))
    for i in range(0, len(y), 20):
        learner.absorb(mirrored[i:i + 20], y[i:i + 20], context=context)
        learner.update(context)
    assert learner.counters["updates"] >= 3  # labels were learned, not all rolled back
    rows = torch.cat(given)
    near = lambda a, b: torch.cdist(a, b.reshape(len(b), -1)).min(1).values < 1e-4  # noqa: E731
    assert near(rows, x).sum() > 100  # the labelled inputs reached the model un-mirrored ...
    # ... and mirrored only where the label screen reads them as they came (with the reference's view)
    assert near(rows, mirrored).sum() <= 2 * len(y)
    with torch.no_grad():
        assert float((learner.model(x).argmax(1) == y).float().mean()) >= 0.9


def test_labels_a_week_late_about_a_domain_the_traffic_left_are_kept_not_learned(demo_model, reference, digits):
    """Issue 28: a label days late answers a prediction of its own time. Labels about clean inputs
    arriving while the traffic is rotated are from a past domain: logged as such, never trained on
    (they would pull the weights back towards traffic that no longer comes); week-old labels about
    the domain still served are learned like fresh ones."""
    from selfheal_core.storage import SQLitePredictionRecord

    x_ref, y_ref = reference
    _, _, x_te, y_te = digits
    x_old, y_old = resample(x_te, y_te, 96, seed=5)
    x_now, _ = resample(x_te, y_te, 256, seed=6)
    week_ago = time.time() - 7 * 86400
    for traffic, expect_past in ((corrupt(x_now, "rotate", 4, seed=6), True), (x_now, False)):
        record = SQLitePredictionRecord()
        record.add(traffic, torch.zeros(len(traffic)), None)
        log = SQLiteFeedbackLog()
        log.append(x_old, [encode_target(t) for t in y_old], [None] * 96, [None] * 96, predicted=[week_ago] * 96)
        learner = Learner(copy.deepcopy(demo_model), x_ref, HealConfig(), reference_targets=y_ref)
        learner.absorb_entries(next(log.entries()), None, log, current=lambda: record.newest(256))
        by_status = log.stats()["by_status"]
        if expect_past:
            assert by_status == {"past": 96} and learner.counters["past_domain"] == 96
            assert learner.counters["feedback"] == 0 and learner.gradient.pending == 0
        else:
            assert "past" not in by_status and learner.counters["past_domain"] == 0
            assert learner.counters["feedback"] == 96
        ages = learner.status()["label_age"]
        assert ages["labels"] == 96 and ages["p50_s"] >= 7 * 86400 - 60


def test_the_reference_is_read_with_the_source_statistics_whatever_serving_adapted_to(demo_model, reference):
    """Issue 27: the reference check read the clean reference through serving's adapted statistics
    (the drifted traffic's): clean inputs answered near chance there and per-class recall swung with
    every step, so it judged updates on noise. It reads them as the reference was read."""
    x_ref, y_ref = reference
    learner = Learner(copy.deepcopy(demo_model), x_ref, HealConfig(), reference_targets=y_ref)
    clean = learner._reference_recall()
    drifted = {"active": True, "mean": [torch.full_like(m.running_mean, 3.0) for m in learner.parts.batchnorms],
               "sq": [torch.full_like(m.running_mean, 10.0) for m in learner.parts.batchnorms]}
    learner.use_context({"norm": drifted})
    with torch.no_grad():
        assert float((learner.model(x_ref).argmax(1) == y_ref).float().mean()) < 0.5  # what it used to read
    assert torch.equal(learner._reference_recall(), clean)
    mean = learner.parts.batchnorms[0].running_mean
    assert torch.allclose(mean, torch.full_like(mean, 3.0))  # serving's statistics are back after the read


def test_learned_weights_that_serve_new_labels_worse_than_the_source_go_back(demo_model, reference, digits):
    """Weights learned earlier (here: a head dragged off) that now serve labels worse than the
    source weights would are put back to the source weights; the labels before judged them."""
    x_ref, y_ref = reference
    _, _, x_te, y_te = digits
    learner = Learner(copy.deepcopy(demo_model), x_ref, HealConfig(), reference_targets=y_ref)
    head = learner.model.get_submodule(learner.parts.head_name)
    with torch.no_grad():
        head.bias[3] += 12.0  # most inputs served as 3
    learner.absorb(x_te[:40], y_te[:40])
    st = learner.status()
    assert learner.counters.get("fallbacks") == 1 and st["source_check"]["fallbacks"] == 1, st
    assert all(torch.equal(v, demo_model.state_dict()[k]) for k, v in learner.model.named_parameters())
    # honest learning from there is not called worse: the source weights' loss is no bar to it
    for i in range(40, 400, 20):
        learner.absorb(x_te[i:i + 20], y_te[i:i + 20])
        learner.update()
    assert learner.counters["fallbacks"] == 1 and learner.counters["updates"] >= 3, learner.counters
    restored = Learner(copy.deepcopy(demo_model), x_ref, HealConfig(), reference_targets=y_ref)
    restored.load_state_dict(learner.state_dict())
    assert restored.status()["source_check"] == learner.status()["source_check"]


def test_the_learner_copies_only_what_learning_moves_and_a_state_saved_whole_still_restores(demo_model, reference,
                                                                                             digits):
    """Issue 28: the learner's copy of the source is what it can move (the trained parameters,
    the output layer, buffers), not the model again (45 MB of a ResNet-18's learner), and its
    state saves only those. A state saved whole, with a tensor moved outside them, still loads:
    that tensor is published as changed and a reset takes it back to the source."""
    from dataclasses import replace

    x_ref, y_ref = reference
    _, _, x_te, y_te = digits
    config = HealConfig()
    config = replace(config, learn=replace(config.learn, params="norm_and_last"))
    learner = Learner(copy.deepcopy(demo_model), x_ref, config, reference_targets=y_ref)
    whole = {k: v.clone() for k, v in demo_model.state_dict().items()}
    movable = set(learner.gradient.params) | {k for k, _ in demo_model.named_buffers()}
    assert set(learner._source) == movable and len(movable) < len(whole)
    assert set(learner.state_dict()["model"]) == movable
    x, y = resample(x_te, y_te, 64, seed=6)
    for i in range(0, 64, 16):
        learner.absorb(corrupt(x[i:i + 16], "rotate", 4, seed=i), y[i:i + 16])
        learner.update()
    saved = learner.state_dict()
    conv = next(k for k in whole if k not in movable and k.endswith("weight"))
    old = {**saved, "model": {**whole, **saved["model"], conv: whole[conv] + 0.01}}  # saved whole, one more moved
    again = Learner(copy.deepcopy(demo_model), x_ref, config, reference_targets=y_ref)
    again.load_state_dict(old)
    assert torch.equal(again.model.state_dict()[conv], whole[conv] + 0.01)
    assert conv in again.published(2).weights and conv in again.state_dict()["model"]
    for k, v in saved["model"].items():
        assert torch.equal(again.model.state_dict()[k], v), k
    bad = {**saved, "model": {**saved["model"], "no.such.weight": torch.zeros(1)}}
    with pytest.raises(ValueError, match="lacks"):
        again.load_state_dict(bad)
    assert torch.equal(again.model.state_dict()[conv], whole[conv] + 0.01)  # a refused state changes nothing
    again.reset()
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in whole.items())
    assert not again.published(3).weights


@pytest.mark.parametrize("eight_bit", [False, True], ids=["float16", "bytes"])
def test_a_large_reference_is_kept_compact_and_the_source_view_read_from_it_whole(eight_bit):
    """Issue 28: a reference of 3x96x96 images (110 kB each) is kept compact by the learner
    (float16, half its bytes; images decoded from 8 bits as their bytes, a quarter), widened for
    every forward; the source view the workers' detectors are fitted on is read from the
    reference as given, so a worker accepts the learner's statistics; updates, checks and
    publishing run on it."""
    from torch import nn

    from selfheal_core.serving import ServingModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 5, stride=4), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3)).eval()
    gen = torch.Generator().manual_seed(1)
    if eight_bit:  # as a handler decodes an image: levels k / 255
        x_ref = torch.randint(0, 256, (48, 3, 96, 96), generator=gen).float() / 255
    else:
        x_ref = torch.randn(48, 3, 96, 96, generator=gen)
    with torch.no_grad():
        y_ref = model(x_ref).argmax(1)
    learner = Learner(copy.deepcopy(model), x_ref, HealConfig(), reference_targets=y_ref)
    assert learner._reference.dtype == (torch.uint8 if eight_bit else torch.float16)
    assert learner.bayes is not None, learner.bayes_off  # its check reads the compact reference too
    with torch.no_grad():
        assert torch.allclose(learner.reference_view().probs.double(), model(x_ref).softmax(1).double(), atol=1e-6)
    serving = ServingModel(copy.deepcopy(model), x_ref, HealConfig(), reference_targets=y_ref)
    if eight_bit:  # brighter, lower contrast: still 8-bit levels
        x = (torch.randint(0, 256, (64, 3, 96, 96), generator=gen) // 2 + 100).float() / 255
    else:
        x = torch.randn(64, 3, 96, 96, generator=gen) * 1.5 + 0.3
    with torch.no_grad():
        y = model(x).argmax(1)
    results = []
    for i in range(0, 64, 16):
        learner.absorb(x[i:i + 16], y[i:i + 16])
        results.append(learner.update())
    assert any(r.updated or r.rolled_back for r in results)  # trained, judged (the reference replayed)
    serving.install(learner.published(1))
    serving.sync()
    assert serving.version == 1 and serving.counters["rebase_refused"] == 0
    state, _, private = learner.snapshot()
    assert all(v.dtype != torch.float16 for v in state["weights"].values())
    kept = torch.uint8 if eight_bit else torch.float16
    assert learner.gradient.buffer._recent[-1][0].dtype == kept and learner.guard._holdout[0][0].dtype == kept
    again = Learner(copy.deepcopy(model), x_ref, HealConfig(), reference_targets=y_ref)
    again.load_state_dict(private["learner"])  # a restart resumes the same pairs, read back as before
    assert torch.equal(again.gradient.buffer.newest(8)[0], learner.gradient.buffer.newest(8)[0])
    if eight_bit:  # bit for bit: each replayed input is one of those labelled
        assert all(any(torch.equal(r, xi) for xi in x) for r in again.gradient.buffer.newest(8)[0])
