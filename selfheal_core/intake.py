"""Feedback intake: validate a feedback request, resolve prediction ids, one durable append, answer.

Two forms, JSON:
- by id: `{"feedback": [{"id": "<prediction id>", "label": k}, ...]}` (or `"target": v` for
  regression): the input is the one that was served, from the prediction record, already
  preprocessed;
- with inputs: `{"instances": [x, ...], "labels": [k, ...]}` (or `"targets"`): each instance
  is what one inference request would carry, run through the same preprocessing as
  inference (`preprocess`).

Nothing is learned here: the learner consumes the log. A request is accepted whole or
not at all; an error names the problem with an HTTP status (`IntakeError`).
"""
from __future__ import annotations

import math
import threading
from typing import Any, Callable

import torch

from selfheal_core.errors import ClientError
from selfheal_core.storage import (DuplicateFeedback, FeedbackLog, PredictionRecord, StorageError, ascii_safe,
                                   encode_target)
from selfheal_core.task import Task


IntakeError = ClientError  # one client-error type for every server (its older name here)


def _echo(value: Any) -> str:
    return ascii_safe(repr(value), 40)


def _ids(pids: list[str]) -> str:
    shown = ", ".join(ascii_safe(p, 40) for p in pids[:5])
    return shown + (f" and {len(pids) - 5} more" if len(pids) > 5 else "")


MAX_ID_CHARS = 64  # ids are 32 hex characters; anything longer or non-ASCII never was one


class Intake:
    """Turns feedback requests into feedback-log rows."""

    def __init__(self, task: Task, log: Callable[[], FeedbackLog], records: Callable[[], PredictionRecord],
                 preprocess: Callable[[list[Any]], torch.Tensor], max_items: int = 256, wait_s: float = 5.0,
                 on_append: Callable[[list[int]], None] | None = None) -> None:
        self.task = task
        self._log, self._records = log, records  # opened lazily: a broken log fails the request, not start-up
        self.preprocess = preprocess  # instances (request bodies) -> validated inputs (N, ...)
        self.max_items = max_items
        self.wait_s = wait_s
        self.on_append = on_append
        self.counters = {"accepted": 0, "refused": 0, "requests": 0}
        self._lock = threading.Lock()  # guards the counters only: requests run concurrently (the log
        # serialises appends and refuses an id answered twice), so one slow lookup blocks nobody else

    def submit(self, body: Any, source: str = "management-api") -> dict:
        """Validate and append; returns the answer. IntakeError with nothing written on any problem.
        Safe to call from many threads at once."""
        try:
            result = self._submit(body, source)
        except IntakeError:
            self._count(refused=1)
            raise
        self._count(accepted=result["accepted"])
        return result

    def _count(self, accepted: int = 0, refused: int = 0) -> None:
        with self._lock:
            self.counters["requests"] += 1
            self.counters["accepted"] += accepted
            self.counters["refused"] += refused

    def _submit(self, body: Any, source: str) -> dict:
        if not isinstance(body, dict):
            raise IntakeError(400, 'feedback must be a JSON object: {"feedback": [{"id": ..., "label": k}]} or '
                                   '{"instances": [...], "labels": [...]}')
        key = "labels" if self.task.is_classifier else "targets"
        if "feedback" in body:
            x, targets, served, confidence, pids, predicted = self._by_id(body["feedback"])
        elif "instances" in body and key in body:
            x, targets = self._with_inputs(body["instances"], body[key])
            served, confidence, pids, predicted = [None] * len(targets), [None] * len(targets), None, None
        else:
            other = "targets" if key == "labels" else "labels"
            hint = f' ({other} are for a {"regression" if other == "targets" else "classification"} model)' \
                if other in body else ""
            raise IntakeError(400, f'feedback needs {{"feedback": [{{"id": ..., "{key[:-1]}": ...}}]}} or '
                                   f'{{"instances": [...], "{key}": [...]}}{hint}')
        try:
            seqs = self._log().append(x, targets, served, confidence, pids, source, predicted=predicted)
        except DuplicateFeedback as exc:
            raise IntakeError(409, f"{exc}: feedback is taken once per prediction") from None
        except StorageError as exc:
            raise IntakeError(exc.code, f"feedback log unavailable: {exc.message}") from None
        if self.on_append is not None:
            self.on_append(seqs)
        return {"accepted": len(seqs), "logged": len(seqs), "seq": [seqs[0], seqs[-1]], "learning": "queued"}

    # ------------------------------------------------------------------ the two forms
    def _by_id(self, items: Any) -> tuple:
        key = "label" if self.task.is_classifier else "target"
        if not isinstance(items, list) or not items:
            raise IntakeError(400, f'"feedback" must be a non-empty list of {{"id": ..., "{key}": ...}}')
        if len(items) > self.max_items:
            raise IntakeError(413, f"{len(items)} feedback items exceed the limit of {self.max_items}")
        if not all(isinstance(it, dict) and isinstance(it.get("id"), str) and key in it for it in items):
            raise IntakeError(400, f'each feedback item must be {{"id": "<prediction id>", "{key}": ...}}')
        pids = [it["id"] for it in items]
        bad = [p for p in pids if not (p.isascii() and p.isprintable() and 0 < len(p) <= MAX_ID_CHARS)]
        if bad:
            raise IntakeError(400, f"prediction id {_echo(bad[0])} is not an id selfheal hands out (printable "
                                   f"ASCII, at most {MAX_ID_CHARS} characters)")
        if len(set(pids)) != len(pids):
            raise IntakeError(400, "the same prediction id appears twice in one request")
        targets = self._targets([it[key] for it in items], "feedback")
        try:
            answered = self._log().answered(pids)
            if answered:
                raise IntakeError(409, f"feedback already received for prediction id(s) {_ids(answered)}: "
                                       "feedback is taken once per prediction")
            found, unknown, pending = self._records().lookup(pids, self.wait_s)
        except StorageError as exc:
            raise IntakeError(exc.code, f"prediction record unavailable: {exc.message}") from None
        if pending:  # handed out by a worker that has not written them (yet): not final, unlike 404
            raise IntakeError(503, f"prediction id(s) {_ids(pending)} not recorded yet (their worker has not "
                                   "written them: its disk may be full); retry later")
        if unknown:
            raise IntakeError(404, f"unknown prediction id(s) {_ids(unknown)} (never served, or older than the "
                                   "prediction record keeps: feedback_retention and record_bytes)")
        x = torch.stack([found[p].x for p in pids])
        served = [self._served_json(found[p].served) for p in pids]
        confidence = [found[p].confidence for p in pids]
        return x, targets, served, confidence, pids, [found[p].time for p in pids]

    def _served_json(self, served: torch.Tensor) -> str:
        return encode_target(served.long().reshape(()) if self.task.is_classifier else served.reshape(-1))

    def _with_inputs(self, instances: Any, values: Any) -> tuple[torch.Tensor, list[str]]:
        if not isinstance(instances, list) or not instances:
            raise IntakeError(400, '"instances" must be a non-empty list of inputs')
        if len(instances) > self.max_items:
            raise IntakeError(413, f"{len(instances)} inputs exceed the limit of {self.max_items}")
        targets = self._targets(values, "labels" if self.task.is_classifier else "targets")
        x = self.preprocess(instances)
        if len(targets) != len(x):
            raise IntakeError(400, f"got {len(targets)} {'labels' if self.task.is_classifier else 'targets'} for "
                                   f"{len(x)} instances")
        return x, targets

    # ------------------------------------------------------------------ targets
    def _targets(self, values: Any, what: str) -> list[str]:
        if not isinstance(values, list) or not values:
            raise IntakeError(400, f"{what} must be a non-empty list")
        if len(values) > self.max_items:
            raise IntakeError(413, f"{len(values)} {what} exceed the limit of {self.max_items}")
        return [encode_target(self._target(v, what)) for v in values]

    def _target(self, v: Any, what: str) -> torch.Tensor:
        if self.task.is_classifier:
            if isinstance(v, bool) or not isinstance(v, int):
                hint = " (real-valued targets need task: regression)" if isinstance(v, float) else ""
                raise IntakeError(400, f"{what}: label {_echo(v)} is not an integer{hint}")
            if not 0 <= v < self.task.num_classes:
                raise IntakeError(422, f"{what}: label {v} out of range [0, {self.task.num_classes - 1}]")
            return torch.tensor(v)
        vals = v if isinstance(v, list) else [v]
        if not vals or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in vals):
            raise IntakeError(400, f"{what}: target {_echo(v)} is not a number or a list of numbers")
        if not all(math.isfinite(float(t)) for t in vals):
            raise IntakeError(400, f"{what}: target {_echo(v)} is NaN or infinite")
        if len(vals) != self.task.outputs:
            raise IntakeError(422, f"{what}: target {_echo(v)} has {len(vals)} value(s), the model predicts "
                                   f"{self.task.outputs}")
        return torch.tensor([float(t) for t in vals], dtype=torch.float32)

