"""selfheal's Ray Serve applications: the model's ingress and its learner.

    from selfheal_ray.app import deploy
    deploy("model_store/digits.mar", replicas=2)         # /predictions/digits and /feedback/digits

or `serve run selfheal_ray.app:ingress mar=model_store/digits.mar` and
`serve run selfheal_ray.app:learner mar=... key=...` (application builders).

- **Ingress** (`SelfHealIngress`, any number of replicas on any node):
  `POST /predictions/{model}` with a JSON body as TorchServe's stock handler
  takes (`{"instances": [...]}`, `{"data": x}`, a bare array); each request is
  checked alone (a bad one gets its 4xx, never its neighbours'), then the
  valid ones are batched (`serve.batch`) for one forward. Answers
  `{"predictions": [...]}` with the `X-Selfheal` header; `GET` answers this
  replica's status, with the management key. Each replica follows the versions
  the learner publishes.
- **Learner** (`SelfHealLearner`, one replica: the lease lets one learn):
  `/feedback/{model}` (GET status, POST labels by id or with inputs) and
  `/feedback/{model}/quarantine`, behind a management key of its own
  (`Authorization: Bearer`, `$SELFHEAL_MANAGEMENT_KEY`); Ray's inference
  routes have no authentication of their own.

Replicas on more than one node need PostgreSQL (`log_url` in the handler
settings, or `$SELFHEAL_LOG_URL`): the snapshot folder of one machine is not
seen by the others, so a replica refuses to start without it on a
multi-node cluster.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import ray
import requests
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from selfheal_core.errors import ClientError
from selfheal_core.task import TaskKind
from selfheal_serving.answers import predictions
from selfheal_serving.bundle import archive_name, open_bundle
from selfheal_serving.header import HEADER
from selfheal_serving.learner import KEY_ENV, start_learner
from selfheal_serving.parsing import parse_json, refuse_feedback, request_inputs
from selfheal_serving.runtime import ReplicaRuntime, open_model_storage

log = logging.getLogger("selfheal.ray")


def _alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def _storage(bundle, workdir: str):
    """The shared storage; PostgreSQL where the cluster has more than one node."""
    if not bundle.settings.log_url and _alive_nodes() > 1:
        raise RuntimeError(f"this Ray cluster has {_alive_nodes()} nodes: replicas on different machines share "
                           "versions and labels only through PostgreSQL; set log_url in the handler settings "
                           "(or SELFHEAL_LOG_URL)")
    return open_model_storage(bundle.name, bundle.settings, Path(workdir).resolve())


def _error(err: ClientError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.code)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class SelfHealIngress:
    """One replica: the archive's model under a `ReplicaRuntime`, batched across requests."""

    def __init__(self, mar: str, workdir: str = ".", model_name: str | None = None, max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.005, key: str = "") -> None:
        self.bundle = open_bundle(mar, model_name)
        self._key = (key or os.environ.get(KEY_ENV, "")).encode()  # for the status (GET); none: no status
        s = self.bundle.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        replica = serve.get_replica_context().replica_id.unique_id if _in_serve() else uuid.uuid4().hex[:8]
        metrics = None
        try:
            from selfheal_ray.metrics import RayMetrics

            metrics = RayMetrics(self.bundle.name, replica)
        except Exception as exc:  # metrics are not worth a replica
            log.warning("Ray metrics unavailable: %s", exc)
        self.runtime = ReplicaRuntime(self.bundle.name, s, self.bundle.model, self.bundle.inputs, self.bundle.targets,
                                      _storage(self.bundle, workdir), self.bundle.calibration, metrics,
                                      member=f"ray-{replica}").start()
        self.kind = TaskKind(s.task)
        self._forward.set_max_batch_size(max_batch_size)
        self._forward.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def __call__(self, request: Request) -> Response:
        if request.method == "GET":  # a replica's status is the operator's, as on TorchServe's management port
            scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
            if not (self._key and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                                       self._key)):
                return _error(ClientError(401, "a replica's status needs the management key: Authorization: Bearer "
                                               "<key>"))
            return JSONResponse(self.runtime.describe())
        if request.method != "POST":
            return _error(ClientError(405, f"{request.method} is not a method of this route: POST (or GET status)"))
        s = self.bundle.settings
        try:
            body = parse_json(await request.body(), s.json_limits, s.max_body_bytes)
            refuse_feedback(body, f"on /feedback/{self.bundle.name}, with the management key")
            x = self.runtime.check(request_inputs(body, tuple(self.bundle.inputs.shape[1:]), self.bundle.inputs.dtype,
                                                  s.max_instances))
        except ClientError as err:
            return _error(err)
        answer, header = await self._forward(x)
        return JSONResponse({"predictions": answer}, headers={HEADER: header})

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _forward(self, xs: list[torch.Tensor]) -> list[tuple[list, str]]:
        """The batch's checked inputs in one forward; each request's answer and header."""
        sizes = [len(x) for x in xs]
        batch = torch.cat(xs)
        outputs = self.runtime.predict(batch)
        self.runtime.note_batch(len(xs), len(xs))
        out, start = [], 0
        for n, x in zip(sizes, xs):
            part = outputs[start:start + n]
            start += n
            ids = self.runtime.record(x, part)
            out.append((predictions(part, self.kind), self.runtime.header(ids)))
        return out

    def __del__(self) -> None:
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.close()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class SelfHealLearner:
    """The model's learner in a replica of its own; its intake listens on the replica's loopback
    and this deployment forwards `/feedback/{model}[...]` to it (auth included)."""

    def __init__(self, mar: str, workdir: str = ".", model_name: str | None = None, key: str = "",
                 nice: int = 10) -> None:
        key = key or os.environ.get(KEY_ENV, "")
        if not key:
            raise RuntimeError(f"the learner's routes need a management key: key=... or ${KEY_ENV}")
        bundle = open_bundle(mar, model_name)
        self.model = bundle.name
        self.storage = _storage(bundle, workdir)
        self.handle = start_learner(bundle.name, bundle.model, bundle.inputs, bundle.targets, bundle.settings,
                                    self.storage, keys=(key,), member=f"ray-learner-{uuid.uuid4().hex[:8]}")
        # learning yields the CPU to the ingress replicas on the node; the intake thread stays prompt
        self._thread = threading.Thread(target=self.handle.run, kwargs={"nice": nice}, name="selfheal-learner",
                                        daemon=True)
        self._thread.start()
        self._http = requests.Session()

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        tail = path[path.index(f"/feedback/{self.model}") + len(f"/feedback/{self.model}"):] \
            if f"/feedback/{self.model}" in path else ""
        url = f"http://127.0.0.1:{self.handle.port}/feedback/{self.model}{tail}"
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        body = await request.body()
        reply = await asyncio.to_thread(self._http.request, request.method, url, data=body, headers=headers,
                                        timeout=120)
        return Response(reply.content, status_code=reply.status_code, media_type="application/json")

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the learning loop stopped")

    def __del__(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None:
            handle.stop()


def _in_serve() -> bool:
    try:
        serve.get_replica_context()
        return True
    except Exception:
        return False


def ingress(args: dict[str, Any]):
    """`serve run selfheal_ray.app:ingress mar=... [replicas=2 workdir=. model_name=... key=...]` (key, for
    the replicas' status: default $SELFHEAL_MANAGEMENT_KEY)"""
    return SelfHealIngress.options(num_replicas=int(args.get("replicas", 2))).bind(
        args["mar"], args.get("workdir", "."), args.get("model_name"), key=args.get("key", ""))


def learner(args: dict[str, Any]):
    """`serve run selfheal_ray.app:learner mar=... [key=... workdir=.]` (key default $SELFHEAL_MANAGEMENT_KEY)"""
    return SelfHealLearner.bind(args["mar"], args.get("workdir", "."), args.get("model_name"), args.get("key", ""))


def deploy(mar: str, replicas: int = 2, workdir: str = ".", key: str = "", model_name: str | None = None) -> str:
    """Both applications on the running Serve instance: `/predictions/{model}` and `/feedback/{model}`."""
    name = model_name or archive_name(mar)
    key = key or os.environ.get(KEY_ENV, "")
    if not key:  # replicas read the environment of `ray start`, not this one's: the key travels as an argument
        raise RuntimeError(f"the learner's routes need a management key: set ${KEY_ENV}")
    workdir = str(Path(workdir).resolve())
    serve.run(learner({"mar": mar, "workdir": workdir, "model_name": name, "key": key}), name=f"{name}-learner",
              route_prefix=f"/feedback/{name}")
    serve.run(ingress({"mar": mar, "workdir": workdir, "model_name": name, "replicas": replicas, "key": key}), name=name,
              route_prefix=f"/predictions/{name}")
    return name
