"""Task: outputs, targets, losses and errors for classification, binary and regression."""
from __future__ import annotations

import pytest
import torch

from selfheal_core.task import Task, TaskKind


@pytest.mark.parametrize("kind, outputs, width", [("classification", torch.randn(4, 5), 5),
                                                  ("binary", torch.randn(4, 1), 1), ("binary", torch.randn(4), 1),
                                                  ("regression", torch.randn(4, 3), 3),
                                                  ("regression", torch.randn(4), 1)])
def test_tasks_fit_their_outputs(kind, outputs, width):
    task = Task.from_outputs(kind, outputs)
    assert task.kind is TaskKind(kind) and task.outputs == width


@pytest.mark.parametrize("kind, outputs, words", [
    ("classification", torch.randn(4, 1), "task: binary"),
    ("classification", torch.randn(4), "task: binary"),
    ("classification", torch.randn(4, 2, 3), "task: regression"),
    ("binary", torch.randn(4, 3), "task: classification"),
    ("regression", torch.randn(4, 2, 2), "(B,) or (B, D)"),
    ("ranking", torch.randn(4, 2), "must be one of"),
])
def test_outputs_that_do_not_fit_name_the_setting(kind, outputs, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Task.from_outputs(kind, outputs)


def test_binary_is_a_two_class_classifier_on_logits_zero_z():
    task = Task.from_outputs("binary", torch.zeros(3, 1))
    z = torch.tensor([[-2.0], [0.0], [3.0]])
    probs = task.probs(z)
    assert torch.allclose(probs[:, 1], torch.sigmoid(z[:, 0])) and task.num_classes == 2
    labels, conf = task.served(z)
    assert labels.tolist() == [0, 0, 1]
    y = torch.tensor([0, 1, 1])
    assert torch.allclose(task.loss(z, y), torch.nn.functional.binary_cross_entropy_with_logits(z[:, 0], y.float()))
    assert torch.allclose(task.from_class_logits(task.class_logits(z), z), z)


@pytest.mark.parametrize("kind, outputs, good, bad, words", [
    ("classification", torch.randn(2, 4), torch.tensor([0, 3]), torch.tensor([0.5, 1.0]), "integer"),
    ("classification", torch.randn(2, 4), torch.tensor([0, 3]), torch.tensor([0, 4]), "out of range"),
    ("regression", torch.randn(2, 1), torch.tensor([1.5, -2.0]), torch.tensor([1, 2]), "real numbers"),
    ("regression", torch.randn(2, 2), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0], [2.0]]),
     "2 value"),
    ("regression", torch.randn(2, 1), torch.tensor([1.0, 2.0]), torch.tensor([1.0, float("nan")]), "NaN"),
])
def test_targets_are_checked(kind, outputs, good, bad, words):
    task = Task.from_outputs(kind, outputs)
    task.check_targets(good, 2)
    with pytest.raises(ValueError, match=words):
        task.check_targets(bad, 2)


def test_regression_errors_and_loss():
    task = Task.from_outputs("regression", torch.zeros(2, 1))
    raw = torch.tensor([[1.0], [3.0]])
    y = torch.tensor([[2.0], [3.0]])
    assert task.errors(raw, y).tolist() == [1.0, 0.0]
    assert float(task.loss(raw, y)) == pytest.approx(0.5)
    assert task.probs(raw) is None and task.served(raw)[1] is None
