"""The learner process of a model: feedback intake, and (while it holds the lease) learning.

Started by a worker (`selfheal_torchserve.supervisor`) with the unpacked .mar,
or on its own by `selfheal learn --mar model.mar` (a container or deployment
of its own, with the log and snapshots in PostgreSQL). It builds the user's
handler class in the learner role: the same model loading and the same
`preprocess` as the workers, so feedback given with inputs is read exactly as
inference requests are.

The learner itself (intake HTTP threads, the loop that owns the `Learner`) is
`selfheal_serving.learner.start_learner`; here it listens on loopback, on a
random port, and announces that port and a random secret in the announcement
file the feedback plugin reads. With `--listen` and a management key it is
also reachable directly (a learner of its own beside KServe or Ray Serve
replicas).

It exits when the TorchServe frontend that started it is gone, when the .mar
it was given disappears, or on SIGTERM.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from selfheal_serving.learner import KEY_ENV, LearnerHandle, fixed_mmap_threshold, start_learner
from selfheal_serving.parsing import decode_b64
from selfheal_serving.runtime import open_model_storage
from selfheal_serving.settings import HandlerSettings
from selfheal_torchserve.mixin import ROLE_ENV
from selfheal_torchserve.supervisor import announcement

log = logging.getLogger("selfheal.learner")



def build_handler(model_dir: Path, handler: str, model_name: str):
    """The user's handler class, initialised in the learner role from an unpacked .mar."""
    from ts.context import Context, RequestProcessor

    os.environ[ROLE_ENV] = "learner"
    sys.path.insert(0, str(model_dir))
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = {}
    config_file = manifest.get("model", {}).get("configFile")
    if config_file:
        import yaml

        config = yaml.safe_load((model_dir / config_file).read_text()) or {}
    module_name, _, qualname = handler.removesuffix(".py").partition(":")
    obj: Any = importlib.import_module(module_name.split("/")[-1])
    if not qualname:  # as TorchServe does: the one class the handler module defines
        from ts.utils.util import list_classes_from_module

        classes = list_classes_from_module(obj)
        if len(classes) != 1:
            raise RuntimeError(f"handler module {module_name} must define one class, found {classes}")
        qualname = classes[0].__qualname__
    for part in qualname.split("."):
        obj = getattr(obj, part)
    context = Context(model_name, str(model_dir), manifest, 1, None, "selfheal-learner", model_yaml_config=config)
    context.request_processor = [RequestProcessor({})]
    instance = obj()
    instance.initialize(context)
    instance.context = context
    return instance


def handler_reader(handler):
    """One feedback instance -> its inputs, through the handler's own preprocess (base64 instances
    decoded to bytes first, as an image request's body is)."""
    lock = threading.Lock()  # a user's preprocess need not be thread-safe

    def read(value: Any) -> torch.Tensor:
        body = decode_b64(value) if isinstance(value, dict) and "b64" in value else value
        with lock:
            return handler.preprocess([{"body": body}])

    return read


def write_announcement(path: Path, info: dict) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="selfheal learner process (started by the TorchServe workers)")
    ap.add_argument("--model-dir", type=Path, required=True, help="the unpacked .mar")
    ap.add_argument("--handler", required=True, help="module:Class of the handler")
    ap.add_argument("--model-name", required=True)
    ap.add_argument("--workdir", type=Path, required=True, help="TorchServe's working directory")
    ap.add_argument("--frontend-pid", type=int, default=0, help="exit when this process is gone")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--intake-only", action="store_true", help="take feedback, never learn (learner: external)")
    ap.add_argument("--host", default="127.0.0.1", help="the intake's address (loopback unless reached directly)")
    ap.add_argument("--port", type=int, default=0, help="the intake's port (0: any free one, announced)")
    ap.add_argument("--key", default=os.environ.get(KEY_ENV, ""),
                    help=f"a management key callers may give as Authorization: Bearer (default ${KEY_ENV})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    torch.set_num_threads(args.threads)
    fixed_mmap_threshold()
    handler = build_handler(args.model_dir, args.handler, args.model_name)
    settings: HandlerSettings = handler.selfheal_settings
    model, inputs, targets = handler.selfheal_parts
    handler.selfheal_parts = None
    storage = open_model_storage(args.model_name, settings, args.workdir)
    learner: LearnerHandle = start_learner(args.model_name, model, inputs, targets, settings, storage,
                                           handler_reader(handler), learn=not args.intake_only,
                                           secret=secrets.token_hex(32), keys=tuple(filter(None, [args.key])),
                                           host=args.host, port=args.port)
    # the learner keeps what it needs of them: the reference as loaded (74 MB of 224x224 images in
    # float32) would stay beside the learner's compact copy for the life of the process
    del model, inputs, targets
    path = announcement(args.workdir, args.model_name)
    write_announcement(path, {"pid": os.getpid(), "port": learner.port, "secret": learner.secret,
                              "started": time.time(), "model": args.model_name})

    def stop(*_a) -> None:
        learner.stop()

    signal.signal(signal.SIGTERM, stop)

    def watch() -> None:  # the frontend and the unpacked .mar outlive us, not the other way round
        while not learner.service.stop.wait(1.0):
            gone = args.frontend_pid and not _pid_exists(args.frontend_pid)
            if gone or not args.model_dir.exists():
                log.info("TorchServe or the model is gone: stopping")
                stop()

    threading.Thread(target=watch, name="watch", daemon=True).start()
    learner.run(nice=args.nice)  # start-up ran at the worker's priority; learning yields to serving
    info = {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    if info.get("pid") == os.getpid():
        path.unlink(missing_ok=True)
    storage.close()
    return 0


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


if __name__ == "__main__":
    sys.exit(main())
