"""The learner's loop keeps its failures and its word (issue 26 H, silent failures): a snapshot
directory it cannot write is a fault kept until a publish succeeds, not a dead learner; a decision
refused on timeout is never carried out later."""
from __future__ import annotations

import errno
import tempfile

import pytest

from selfheal_core import Learner
from selfheal_core.storage import StorageUnavailable, open_storage
from selfheal_core.storage.files import FileSnapshotStore
from selfheal_torchserve.errors import RequestError
from selfheal_serving.learner import LearnerService
from selfheal_serving.settings import HandlerSettings


@pytest.fixture()
def service(demo_model, reference, tmp_path):
    storage = open_storage("digits", tmp_path / "snapshots")
    learner = Learner(demo_model, reference[0], reference_targets=reference[1])
    svc = LearnerService(learner, HandlerSettings(), storage, "learner-test", learn=True)
    yield svc
    storage.close()


def test_a_read_only_snapshot_directory_is_a_storage_error_not_a_crash(tmp_path, monkeypatch):
    store = FileSnapshotStore(tmp_path / "snaps")

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(StorageUnavailable, match="Read-only"):
        store.save({"w": 1})


def test_a_failed_publish_stays_a_fault_until_a_publish_succeeds(service, monkeypatch):
    def full(*_a, **_k):
        raise StorageUnavailable("cannot write in /snapshots: Read-only file system")

    monkeypatch.setattr(service.storage.snapshots, "save", full)
    service.learner._dirty = True
    service._publish()  # no exception: the loop goes on
    service._publish_status(board=True)
    fault = service.snapshot_status["faults"]["publish"]
    assert fault["error"] and "Read-only" in fault["error"] and fault["count"] == 1
    service._publish_status(board=True)  # the next round does not clear it
    assert service.snapshot_status["faults"]["publish"]["error"]
    assert service.learner.dirty, "still to be published"
    monkeypatch.undo()
    service._publish()
    service._publish_status(board=True)
    fault = service.snapshot_status["faults"]["publish"]
    assert fault["error"] is None and fault["count"] == 1 and not service.learner.dirty


def test_a_decision_that_timed_out_is_never_carried_out(service):
    with pytest.raises(RequestError) as err:
        service.decide({"pair": [3, 8], "action": "approve"}, timeout=0.05)  # nobody runs the loop
    assert err.value.code == 503 and "nothing was changed" in err.value.message
    before = service.learner.concept.decisions()
    service._run_commands()  # the loop comes round later
    assert service.learner.concept.decisions() == before and service.commands.empty()


@pytest.mark.parametrize("body", [[3, 8], "approve", 7, {"pair": [3, True], "action": "approve"}])
def test_a_decision_that_is_not_an_object_is_a_400(service, body):
    with pytest.raises(RequestError) as err:
        service.decide(body, timeout=0.05)
    assert err.value.code == 400
