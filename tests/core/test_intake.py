"""Feedback intake: validation, ids resolved from the prediction record, one durable append, clear refusals."""
from __future__ import annotations

import threading

import pytest
import torch

from selfheal_core.intake import Intake, IntakeError
from selfheal_core.storage import StorageFull, open_storage
from selfheal_core.task import Task, TaskKind

CLS = Task(TaskKind.CLASSIFICATION, 4)
REG = Task(TaskKind.REGRESSION, 2)


def preprocess(instances):
    x = torch.tensor(instances, dtype=torch.float32)
    if x.dim() != 2 or x.shape[1] != 3:
        raise IntakeError(400, "instances must be rows of 3 numbers")
    return x


def make(tmp_path, task=CLS, wait_s=1.0):
    storage = open_storage("m", tmp_path)
    worker = storage.open_record()
    appended = []
    intake = Intake(task, lambda: storage.log, lambda: storage.predictions, preprocess, max_items=8,
                    wait_s=wait_s, on_append=appended.extend)
    return intake, storage, worker, appended


def refused(intake, body, code, words):
    before = intake._log().stats()["entries"]
    with pytest.raises(IntakeError) as err:
        intake.submit(body)
    assert err.value.code == code and words in err.value.message, (err.value.code, err.value.message)
    assert err.value.message.isascii()
    assert intake._log().stats()["entries"] == before, "a refused request appends nothing"


def test_feedback_by_id_uses_the_served_input_once(tmp_path):
    intake, storage, worker, appended = make(tmp_path)
    x = torch.randn(2, 3)
    ids = worker.add(x, torch.tensor([1, 2]), torch.tensor([0.9, 0.6]))
    threading.Timer(0.2, worker.flush).start()  # the worker's background flush, just after answering
    out = intake.submit({"feedback": [{"id": ids[0], "label": 3}, {"id": ids[1], "label": 2}]})
    assert out["accepted"] == 2 and appended == [1, 2]
    [rows] = list(storage.log.entries())
    assert torch.equal(rows.x, x) and rows.served == ["1", "2"] and rows.confidence == [pytest.approx(0.9),
                                                                                       pytest.approx(0.6)]
    refused(intake, {"feedback": [{"id": ids[0], "label": 1}]}, 409, "already")


def test_feedback_with_inputs_goes_through_preprocess(tmp_path):
    intake, storage, _, _ = make(tmp_path)
    assert intake.submit({"instances": [[1, 2, 3], [4, 5, 6]], "labels": [0, 3]})["accepted"] == 2
    refused(intake, {"instances": [[1, 2]], "labels": [0]}, 400, "rows of 3")
    refused(intake, {"instances": [[1, 2, 3]], "labels": [0, 1]}, 400, "2 labels for 1")


@pytest.mark.parametrize("body, code, words", [
    ({"feedback": [{"id": "0" * 32, "label": 1}]}, 404, "unknown prediction id"),
    ({"feedback": [{"id": "x", "label": 4}]}, 422, "out of range"),
    ({"feedback": [{"id": "x", "label": 1.5}]}, 400, "task: regression"),
    ({"feedback": [{"id": "x", "label": True}]}, 400, "not an integer"),
    ({"feedback": [{"id": "x", "target": 1.5}]}, 400, "each feedback item"),
    ({"feedback": [{"label": 1}]}, 400, "each feedback item"),
    ({"feedback": [{"id": "x", "label": 1}] * 2}, 400, "twice"),
    ({"feedback": [{"id": str(i), "label": 1} for i in range(9)]}, 413, "limit"),
    ({"feedback": []}, 400, "non-empty"),
    ({"instances": [[1, 2, 3]], "targets": [1.0]}, 400, "regression"),
    ({"instances": [[1, 2, 3]]}, 400, "feedback needs"),
    ([1, 2], 400, "JSON object"),
    ({"feedback": [{"id": "caf\u00e9\u2603", "label": 1}]}, 400, "caf\\xe9\\u2603"),
    ({"feedback": [{"id": "\udc80", "label": 1}]}, 400, "not an id"),
])
def test_bad_classification_feedback(tmp_path, body, code, words):
    intake, _, _, _ = make(tmp_path)
    refused(intake, body, code, words)


@pytest.mark.parametrize("body, code, words", [
    ({"instances": [[1, 2, 3]], "targets": [[1.0, float("nan")]]}, 400, "NaN"),
    ({"instances": [[1, 2, 3]], "targets": [[1.0]]}, 422, "the model predicts 2"),
    ({"instances": [[1, 2, 3]], "targets": ["a"]}, 400, "not a number"),
    ({"instances": [[1, 2, 3]], "labels": [1]}, 400, "classification"),
    ({"feedback": [{"id": "x", "label": 1}]}, 400, '"target"'),
])
def test_bad_regression_feedback(tmp_path, body, code, words):
    intake, _, _, _ = make(tmp_path, REG)
    refused(intake, body, code, words)


def test_regression_targets_are_logged(tmp_path):
    intake, storage, _, _ = make(tmp_path, REG)
    intake.submit({"instances": [[1, 2, 3]], "targets": [[1.5, 2]]})
    assert next(storage.log.entries()).target == ["[1.5, 2.0]"]


def test_storage_failures_answer_503_and_507_naming_the_cause(tmp_path):
    intake, storage, _, _ = make(tmp_path)
    broken = tmp_path / "broken.sqlite"
    broken.write_bytes(b"this is not a database at all" * 100)
    from selfheal_core.storage import SQLiteFeedbackLog

    intake._log = lambda: SQLiteFeedbackLog(broken)
    refused_body = {"instances": [[1, 2, 3]], "labels": [0]}
    with pytest.raises(IntakeError) as err:
        intake.submit(refused_body)
    assert err.value.code == 503 and "feedback log unavailable" in err.value.message and "broken.sqlite" in \
        err.value.message

    class Full:
        path = "/data/fb.sqlite"

        def append(self, *a, **k):
            raise StorageFull("no space left for /data/fb.sqlite: database or disk is full")

    intake._log = lambda: Full()
    with pytest.raises(IntakeError) as err:
        intake.submit(refused_body)
    assert err.value.code == 507 and "/data/fb.sqlite" in err.value.message


def test_ids_their_worker_has_not_written_answer_503_not_a_final_404(tmp_path):
    """A worker whose disk is full keeps its ids in memory; feedback for them answered 404 "never
    served", which a labeller takes as final, and 200 once space returned (issue 26 I)."""
    intake, _, _, appended = make(tmp_path, wait_s=0.3)
    worker = open_storage("m", tmp_path).open_record()  # another process's record: its buffer is its own
    ids = worker.add(torch.randn(2, 3), torch.tensor([1, 2]), torch.tensor([0.9, 0.8]))  # not flushed
    with pytest.raises(IntakeError) as err:
        intake.submit({"feedback": [{"id": ids[0], "label": 1}]})
    assert err.value.code == 503 and "not recorded yet" in err.value.message and not appended
    worker.flush()  # space returned
    assert intake.submit({"feedback": [{"id": ids[0], "label": 1}]})["accepted"] == 1
