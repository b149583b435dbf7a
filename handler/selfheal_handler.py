"""TorchServe handler: a thin bridge between TorchServe requests and a SelfHealer.

Per request of a batch it parses JSON into an inference or a feedback request,
answers bad input with its own 4xx (the other requests of the batch are still
served), runs all inference inputs of the batch through one `predict`, and
answers `GET /models/{m}?customized=true` with `SelfHealer.status()`.

Feedback reaches the handler only through the management-port plugin
(`POST /feedback/{model}`, plugins/feedback), which forwards it on the
inference port with an internal credential (see `feedback_credential`); the
same body from an inference client, without it, is refused with 403.
"""
from __future__ import annotations

import hmac
import json
import sys
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from selfheal_request import (HandlerSettings, RequestError, body_json, feedback_credential, header, label_list,
                              load_model, server_workdir)
from ts.torch_handler.base_handler import BaseHandler

from selfheal_core import SelfHealer, SnapshotStore
from selfheal_core.feedback_log import DuplicateFeedback, open_feedback_log
from selfheal_core.recent import open_prediction_record

log = logging.getLogger(__name__)

_ERROR_TYPES = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 409: "Conflict", 413: "PayloadTooLarge",
                422: "UnprocessableEntity"}


class SelfHealHandler(BaseHandler):
    """TorchServe handler serving a SelfHealer-wrapped classifier."""

    def initialize(self, context) -> None:
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        self.settings = HandlerSettings.from_yaml((context.model_yaml_config or {}).get("handler"))
        torch.set_num_threads(self.settings.torch_threads)
        sys.setswitchinterval(self.settings.gil_switch_interval_s)
        gpu = props.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu}" if torch.cuda.is_available() and gpu is not None else "cpu")
        model = load_model(model_dir, context.manifest, self.settings.model_class).to(self.device)
        ref = torch.load(model_dir / self.settings.reference_file, map_location="cpu", weights_only=True)
        snap_dir = Path(self.settings.snapshot_dir)
        if not snap_dir.is_absolute():
            snap_dir = server_workdir() / snap_dir
        model_dir_store = snap_dir / context.model_name
        store = SnapshotStore(model_dir_store, keep=self.settings.snapshot_keep)
        log_url = self.settings.log_url or model_dir_store / "feedback.sqlite"
        feedback_log = open_feedback_log(log_url, context.model_name)
        self.healer = SelfHealer(model, ref["inputs"], self.settings.heal, ref.get("labels"), store, feedback_log)
        self.healer.resume()  # newest snapshot, then the labels logged after it
        self.recent = open_prediction_record(self.settings.log_url or model_dir_store / "predictions.sqlite",
                                             self.settings.recent_predictions, context.model_name)
        self.model_name = context.model_name
        self._drift = self._drift_now()
        self.model, self.context, self.initialized = model, context, True
        # Workers and replicas sharing the store stay one model: a daemon thread picks up newer
        # published versions and log rows from the others, and publishes when this one holds the lease.
        threading.Thread(target=self._sync_loop, name="selfheal-sync", daemon=True).start()
        enabled = feedback_credential(self.model_name, self.settings.feedback_secret_env) is not None
        log.info("selfheal handler ready: model %s, version %d, snapshots in %s, log %s, feedback %s",
                 context.model_name, self.healer.version, store.directory, feedback_log.path,
                 "via POST /feedback/{model} on the management port" if enabled
                 else f"disabled (no key_file.json and no {self.settings.feedback_secret_env})")

    def _drift_now(self) -> dict:
        state = self.healer.monitor.state
        return {"detected": state.detected, "firing": state.firing, "scores": state.scores}

    def _sync_loop(self) -> None:
        """Off the request path: monitor queued predictions, learn from logged labels, join the others."""
        next_sync = time.monotonic()
        while True:
            time.sleep(self.settings.drain_interval_s)
            try:
                if self.healer.drain():
                    self._drift = self._drift_now()  # what responses report until the next drain
                self.recent.flush()
                if time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + self.settings.sync_interval_s
                    if self.healer.sync():
                        log.info("synced: version %d, log absorbed to %d", self.healer.version,
                                 self.healer.status()["feedback_log"]["absorbed"])
            except Exception:  # keep serving; the next round retries
                log.exception("background healing step failed")

    # ------------------------------------------------------------------ entry point
    def handle(self, data: list[dict], context) -> list[Any]:
        self.context = context
        if self._is_describe():
            return [json.dumps(self.describe())]
        outputs: list[Any] = [None] * len(data)
        pending: list[tuple[int, torch.Tensor]] = []  # inference inputs of this batch
        for idx, row in enumerate(data):
            try:
                body = body_json(row, self.settings.max_body_bytes)
                given = header(context, idx, self.settings.credential_header)
                if given is not None:
                    self._check_credential(given)
                    outputs[idx] = self.feedback_status() if body.get("feedback_status") else self._feedback(body)
                elif {"feedback", "labels", "feedback_status"} & set(body):
                    raise RequestError(403, "feedback is taken on the management API: POST /feedback/"
                                            f"{self.model_name} on the management port, with the management key")
                else:
                    pending.append((idx, self._inputs(body)))
            except RequestError as err:
                outputs[idx] = self._error(context, idx, err)
        if pending:
            self._predict(pending, outputs)
        return outputs

    def _error(self, context, idx: int, err: RequestError) -> dict:
        context.set_response_status(err.code, err.message.replace("\n", " ")[:200], idx)
        return {"code": err.code, "type": _ERROR_TYPES.get(err.code, "Error"), "message": err.message}

    # ------------------------------------------------------------------ inference
    def _inputs(self, body: dict, key: str = "instances") -> torch.Tensor:
        """Validated input tensor (B, ...) from {"instances": [...]} or {"data": x}."""
        if key in body:
            instances = body[key]
            if not isinstance(instances, list) or not instances:
                raise RequestError(400, f'"{key}" must be a non-empty list of inputs')
        elif "data" in body:
            instances = [body["data"]]
        else:
            raise RequestError(400, 'body needs "instances": [x, ...] or "data": x')
        if len(instances) > self.settings.max_instances:
            raise RequestError(413, f"{len(instances)} inputs exceed the limit of {self.settings.max_instances}")
        try:
            x = torch.tensor(instances, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise RequestError(400, "inputs must be numeric arrays of equal shape "
                                    f"{list(self.healer.input_shape)}") from None
        shape = self.healer.input_shape
        squeezed = tuple(d for d in shape if d != 1)
        if tuple(x.shape[1:]) == squeezed != shape:
            x = x.reshape(len(x), *shape)  # e.g. an 8x8 image for a (1, 8, 8) model: add the unit dims
        try:
            return self.healer.check_input(x).cpu()
        except ValueError as exc:
            raise RequestError(400, f"bad inputs: {exc}") from None

    def _predict(self, pending: list[tuple[int, torch.Tensor]], outputs: list[Any]) -> None:
        x = torch.cat([xi for _, xi in pending])  # one forward for the whole TorchServe batch
        version = self.healer.version  # the weights that answer (predict may snapshot afterwards)
        logits = self.inference(x)
        probs = F.softmax(logits, 1).cpu()
        confidence, labels = probs.max(1)
        ids = self.recent.add(x, labels, confidence)
        drift = self._drift if self.settings.background else self._drift_now()
        start = 0
        for idx, xi in pending:
            rows = range(start, start + len(xi))
            start += len(xi)
            outputs[idx] = {
                "predictions": [{"id": ids[r], "label": int(labels[r]),
                                 "probabilities": [round(float(p), 6) for p in probs[r]]} for r in rows],
                "model_version": version,
                "drift": drift,
            }

    def inference(self, data: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Not under torch.inference_mode (BaseHandler's choice): the healer may adapt."""
        return self.healer.predict(data, defer=self.settings.background, checked=True)

    # ------------------------------------------------------------------ feedback
    def _check_credential(self, given: str) -> None:
        expected = feedback_credential(self.model_name, self.settings.feedback_secret_env)
        if expected is None:
            raise RequestError(403, "feedback is disabled: token authorization is off and "
                                    f"{self.settings.feedback_secret_env} is not set")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise RequestError(403, f"invalid {self.settings.credential_header} credential")

    def _feedback(self, body: dict) -> dict:
        if "feedback" not in body and "labels" not in body:
            raise RequestError(400, 'feedback needs {"feedback": [{"id": ..., "label": k}, ...]} '
                                    'or {"instances": [...], "labels": [...]}')
        if "feedback" in body:
            x, y, served, confidence, pids = self._feedback_by_id(body["feedback"])
        else:
            x = self._inputs(body)
            y = label_list(body["labels"], self.healer.num_classes, "labels")
            if len(y) != len(x):
                raise RequestError(400, f"got {len(y)} labels for {len(x)} instances")
            served = confidence = pids = None
        try:
            result = self.healer.feedback(x, y, served, confidence, pids, source="management-api",
                                          defer=self.settings.background)
        except DuplicateFeedback as exc:
            raise RequestError(409, f"{exc}: feedback is taken once per prediction") from None
        except ValueError as exc:
            raise RequestError(400, f"bad feedback: {exc}") from None
        return {"accepted": result["accepted"], "logged": result["accepted"],
                "quarantined": result["quarantined"], "learning": "queued" if self.settings.background else "done",
                "updated": result["updated"], "rolled_back": result["rolled_back"],
                "model_version": result["version"]}

    def _feedback_by_id(self, items: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        if not isinstance(items, list) or not items:
            raise RequestError(400, '"feedback" must be a non-empty list of {"id": ..., "label": k}')
        if len(items) > self.settings.max_instances:
            raise RequestError(413, f"{len(items)} feedback items exceed the limit of {self.settings.max_instances}")
        if not all(isinstance(it, dict) and isinstance(it.get("id"), str) and "label" in it for it in items):
            raise RequestError(400, 'each feedback item must be {"id": "<prediction id>", "label": k}')
        pids = [it["id"] for it in items]
        if len(set(pids)) != len(pids):
            raise RequestError(400, "the same prediction id appears twice in one request")
        y = label_list([it["label"] for it in items], self.healer.num_classes, "feedback")
        found = self.recent.get(pids)
        unknown = [pid for pid in pids if pid not in found]
        if unknown:
            raise RequestError(404, f"unknown prediction id(s): {unknown[:5]} (never served, or older than "
                                    f"the newest {self.settings.recent_predictions} predictions)")
        x = torch.stack([found[p][0] for p in pids])
        served = torch.tensor([found[p][1] for p in pids], dtype=torch.long)
        confidence = torch.tensor([found[p][2] for p in pids], dtype=torch.float64)
        return x, y, served, confidence, pids

    # ------------------------------------------------------------------ status
    def feedback_status(self) -> dict:
        """What GET /feedback/{model} answers: counts, last update, quarantine, guard."""
        st = self.healer.status()
        return {"model": self.model_name, "model_version": st["version"], "log": st["feedback_log"],
                "counters": {k: st["counters"][k] for k in ("feedback", "quarantined", "updates")},
                "last_update": st["learner"]["last_update"], "quarantine": st["quarantine"],
                "guard": st["guard"], "error_rate_score": st["drift"]["scores"].get("error_rate")}

    def describe(self) -> dict:
        status = self.healer.status()
        enabled = feedback_credential(self.model_name, self.settings.feedback_secret_env) is not None
        status["handler"] = {"feedback_enabled": enabled,
                             "snapshot_dir": str(self.healer.store.directory),
                             "recent_predictions": len(self.recent), "device": str(self.device)}
        return status

    def describe_handle(self) -> str:
        return json.dumps(self.describe())
