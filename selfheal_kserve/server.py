"""`python -m selfheal_kserve serve|learner`: a selfheal archive on KServe's model server, and its learner.

    python -m selfheal_kserve serve   --mar model_store/digits.mar --http-port 8080 --grpc-port 8081
    python -m selfheal_kserve learner --mar model_store/digits.mar --port 8090   # key: $SELFHEAL_MANAGEMENT_KEY

Every server process follows the versions the one learner publishes to the
shared storage (files under `snapshot_dir` on one machine, PostgreSQL with
`log_url` across machines or pods). The learner takes feedback on
`/feedback/{model}` with its own key (`Authorization: Bearer`), apart from
the inference ports. KServe binds all interfaces; `--host` picks the address
(127.0.0.1 outside a pod).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("selfheal.kserve")


def _bind(host: str) -> None:
    """Make KServe's REST and gRPC servers listen on `host` (it hard-codes every interface)."""
    from kserve import model_server
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.rest.server import RESTServer

    class HostRESTServer(RESTServer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.config.host = host

    class HostGRPCServer(GRPCServer):
        def __init__(self, port: int, *args, **kwargs) -> None:
            super().__init__(port, *args, **kwargs)
            self._selfheal_port = port

        async def start(self, max_workers):
            from grpc import aio
            real = aio.server

            def server(*a, **kw):  # the listening address is the one thing changed
                srv = real(*a, **kw)
                add = srv.add_insecure_port
                srv.add_insecure_port = lambda _addr: add(f"{host}:{self._selfheal_port}")
                return srv

            aio.server = server
            try:
                return await super().start(max_workers)
            finally:
                aio.server = real

    model_server.RESTServer = HostRESTServer
    model_server.GRPCServer = HostGRPCServer


def _client_errors() -> None:
    """Answer a selfheal ClientError with its code and `{"code", "type", "message"}`, as on TorchServe."""
    from fastapi.responses import JSONResponse
    from kserve import model_server

    from selfheal_core.errors import ClientError

    async def handle(_request, err: ClientError):
        return JSONResponse(status_code=err.code, content=err.body())

    model_server.app.add_exception_handler(ClientError, handle)


def serve(args) -> int:
    import kserve

    from selfheal_kserve.model import SelfHealModel
    from selfheal_serving.bundle import open_bundle
    from selfheal_serving.runtime import open_model_storage

    bundle = open_bundle(args.mar, args.model_name)
    storage = open_model_storage(bundle.name, bundle.settings, Path(args.workdir).resolve())
    model = SelfHealModel(bundle, storage)
    model.load()
    _bind(args.host)
    _client_errors()
    server = kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port,
                                enable_grpc=args.grpc_port > 0, workers=1)
    try:
        server.start([model])
    finally:
        model.stop()
    return 0


def learner(args) -> int:
    import torch

    from selfheal_serving.bundle import open_bundle
    from selfheal_serving.learner import KEY_ENV, fixed_mmap_threshold, start_learner
    from selfheal_serving.runtime import open_model_storage

    key = os.environ.get(KEY_ENV, "")
    if not key:
        log.error("set %s: the learner's routes take it as Authorization: Bearer <key>", KEY_ENV)
        return 2
    torch.set_num_threads(args.threads)
    fixed_mmap_threshold()
    bundle = open_bundle(args.mar, args.model_name)
    storage = open_model_storage(bundle.name, bundle.settings, Path(args.workdir).resolve())
    handle = start_learner(bundle.name, bundle.model, bundle.inputs, bundle.targets, bundle.settings, storage,
                           keys=(key,), host=args.host, port=args.port)
    del bundle  # the learner keeps what it needs: the reference as loaded would stay beside its compact copy
    signal.signal(signal.SIGTERM, lambda *_a: handle.stop())
    signal.signal(signal.SIGINT, lambda *_a: handle.stop())
    try:
        handle.run(nice=args.nice)  # learning yields the CPU to the servers; the intake stays prompt
    finally:
        storage.close()
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m selfheal_kserve", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("serve", "learner"):
        p = sub.add_parser(name)
        p.add_argument("--mar", required=True, help="a .mar from `selfheal archive`, or its unpacked folder")
        p.add_argument("--model-name", help="default: the archive's")
        p.add_argument("--workdir", default=".", help="where a relative snapshot_dir lives")
        p.add_argument("--host", default="0.0.0.0", help="the address to listen on (default: all, as in a pod)")
        if name == "serve":
            p.add_argument("--http-port", type=int, default=8080)
            p.add_argument("--grpc-port", type=int, default=8081, help="0: no gRPC")
        else:
            p.add_argument("--port", type=int, default=8090)
            p.add_argument("--threads", type=int, default=1)
            p.add_argument("--nice", type=int, default=10, help="the learning loop's niceness (0: as the servers)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        return serve(args) if args.cmd == "serve" else learner(args)
    except ValueError as exc:  # a missing or unreadable archive
        log.error("%s", exc)
        return 2
