"""Feedback parts: durable log, prediction record, Bayesian last layer, quarantine, replay."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfheal_bench.data import corrupt, resample
from selfheal_core import HealConfig, SelfHealer
from selfheal_core.config import GuardConfig
from selfheal_core.feedback_log import DuplicateFeedback, SQLiteFeedbackLog
from selfheal_core.learn.bayes import BayesianLastLayer
from selfheal_core.quarantine import Quarantine
from selfheal_core.recent import PredictionRecord


def test_log_round_trip_survives_reopen(tmp_path):
    path = tmp_path / "fb.sqlite"
    log = SQLiteFeedbackLog(path)
    x = torch.randn(5, 1, 8, 8)
    seqs = log.append(x, torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 1, 2, 3, 0]),
              torch.tensor([False, False, False, False, True]), [f"id{i}" for i in range(5)])
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    log.close()
    reopened = SQLiteFeedbackLog(path)
    [rows] = list(reopened.entries(after=0))
    assert torch.equal(rows.x, x) and rows.y.tolist() == [0, 1, 2, 3, 4] and rows.seq == seqs
    assert rows.quarantined.tolist() == [False] * 4 + [True] and rows.served.tolist() == [0, 1, 2, 3, 0]
    assert [len(r.y) for r in reopened.entries(after=seqs[1], batch=2)] == [2, 1]
    assert reopened.stats() | {"last_time": None} == {"entries": 5, "learned": 4, "quarantined": 1,
                                                      "last_seq": seqs[-1], "last_time": None}


def test_log_duplicate_id_writes_nothing():
    log = SQLiteFeedbackLog()
    no = torch.zeros(1, dtype=torch.bool)
    log.append(torch.zeros(1, 3), torch.tensor([1]), None, no, ["a"])
    with pytest.raises(DuplicateFeedback, match="already"):
        log.append(torch.zeros(2, 3), torch.tensor([1, 2]), None, torch.zeros(2, dtype=torch.bool), ["b", "a"])
    assert log.stats()["entries"] == 1 and log.answered(["a", "b"]) == ["a"]


def test_prediction_record_is_bounded_and_durable(tmp_path):
    rec = PredictionRecord(tmp_path / "p.sqlite", capacity=300)
    x = torch.randn(600, 2, 3)
    ids = rec.add(x, torch.arange(600) % 10, torch.full((600,), 0.5))
    assert len(rec) == 300  # pruned every 256 inserts
    assert rec.get(ids[:1]) == {}
    reopened = PredictionRecord(tmp_path / "p.sqlite", capacity=300)
    got = reopened.get([ids[-1]])[ids[-1]]
    assert torch.equal(got[0], x[-1]) and got[1] == 599 % 10 and got[2] == 0.5


def test_bayes_layer_learns_and_reports_shrinking_uncertainty():
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    bayes = BayesianLastLayer(layer, prior_var=0.5, forgetting=1.0)
    feats = torch.randn(60, 6)
    labels = (feats[:, 0] > 0).long() + (feats[:, 1] > 1).long()
    before_loss = F.cross_entropy(layer(feats), labels)
    var_before = bayes.variance(feats).mean()
    for i in range(0, 60, 4):
        bayes.update(feats[i:i + 4], labels[i:i + 4])
    with torch.no_grad():
        assert F.cross_entropy(layer(feats), labels) < before_loss * 0.7
    assert bayes.variance(feats).mean() < var_before * 0.5
    state = bayes.state_dict()
    bayes.reset()
    assert bayes.updates == 0 and bayes.status()["trace"] == pytest.approx(0.5 * 7)
    bayes.load_state_dict(state)
    assert bayes.updates == 60


def test_bayes_layer_without_bias():
    layer = nn.Linear(4, 2, bias=False)
    BayesianLastLayer(layer).update(torch.randn(3, 4), torch.tensor([0, 1, 1]))
    assert layer.bias is None


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


def test_concept_change_is_learned_after_corroboration_and_noise_is_held():
    q = Quarantine(GuardConfig(corroborate=3))
    swap = screen_all(q, [(1, 7), (7, 1)] * 10)
    assert swap[:4].all() and not swap[4:].any() and not q.status()["active"]
    q = Quarantine(GuardConfig(corroborate=3))
    noise = [(k % 10, (k * 3 + 1) % 10) for k in range(10)]  # ten different pairs
    assert screen_all(q, noise).all()
    assert not screen_all(q, noise, conf=0.5).any(), "unsure predictions are never held"
    assert not screen_all(Quarantine(GuardConfig()), noise, drifted=True).any(), "inputs drifted: learn"


def test_restart_replays_log_rows_after_the_snapshot(demo_model, reference, digits, tmp_path):
    _, _, x_te, y_te = digits
    x, y = resample(x_te, y_te, 120, seed=3)
    x = corrupt(x, "rotate", 4, seed=3)
    log_path = tmp_path / "fb.sqlite"
    cfg = HealConfig()
    first = SelfHealer(copy.deepcopy(demo_model), reference[0], cfg, reference[1],
                       feedback_log=SQLiteFeedbackLog(log_path))
    for i in range(0, 120, 20):
        res = first.feedback(x[i:i + 20], y[i:i + 20], ids=[f"p{j}" for j in range(i, i + 20)])
        assert res["accepted"] == 20
    state = first.state_dict()
    with pytest.raises(DuplicateFeedback):
        first.feedback(x[:1], y[:1], ids=["p0"])
    assert first.state_dict()["counters"] == state["counters"], "a duplicate changes nothing"
    # A fresh healer (a restarted worker) with no snapshot replays all 120 rows, in log order.
    second = SelfHealer(copy.deepcopy(demo_model), reference[0], cfg, reference[1],
                        feedback_log=SQLiteFeedbackLog(log_path))
    second.resume()
    st = second.status()
    assert st["counters"]["feedback"] == 120 and st["feedback_log"]["absorbed"] == st["feedback_log"]["last_seq"]
    assert st["counters"]["updates"] > 0
    second.resume()
    assert second.status()["counters"]["feedback"] == 120, "replay is idempotent"
