"""The baselines of scripts/bench_servers.py on KServe and Ray Serve: the same archive's model, the
same request parsing and answers (`selfheal_serving.parsing`, `.answers`), nothing of selfheal's
serving (no monitor, no record, no header, no versions). TorchServe's is `plain_handler.py`.

    python -m selfheal_bench.plain_servers kserve --mar X.mar --host 127.0.0.1 --http-port 8085
"""
from __future__ import annotations

import argparse
import sys

import torch

from selfheal_core.errors import ClientError
from selfheal_core.task import TaskKind
from selfheal_serving.answers import predictions
from selfheal_serving.bundle import open_bundle
from selfheal_serving.parsing import parse_json, request_inputs


class PlainModel:
    """Parse, forward under no_grad, answer: what a server runs without selfheal."""

    def __init__(self, mar: str) -> None:
        self.bundle = open_bundle(mar)
        if self.bundle.settings.torch_threads:
            torch.set_num_threads(self.bundle.settings.torch_threads)
        self.kind = TaskKind(self.bundle.settings.task)
        self.shape = tuple(self.bundle.inputs.shape[1:])

    def inputs(self, body) -> torch.Tensor:
        s = self.bundle.settings
        return request_inputs(body, self.shape, self.bundle.inputs.dtype, s.max_instances)

    def answer(self, x: torch.Tensor) -> list[dict]:
        with torch.inference_mode():
            return predictions(self.bundle.model(x), self.kind)


def kserve_main(args) -> int:
    import kserve

    from selfheal_kserve.server import _bind, _client_errors

    plain = PlainModel(args.mar)

    class Plain(kserve.Model):
        def load(self) -> bool:
            self.ready = True
            return True

        def predict(self, payload, headers=None, response_headers=None):
            return {"predictions": plain.answer(plain.inputs(payload))}

    model = Plain(plain.bundle.name)
    model.load()
    _bind(args.host)
    _client_errors()
    kserve.ModelServer(http_port=args.http_port, grpc_port=0, enable_grpc=False, workers=1).start([model])
    return 0


def ray_plain_app(mar: str, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005):
    """A Ray Serve ingress as selfheal_ray's, batched the same way, without selfheal."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class PlainIngress:
        def __init__(self) -> None:
            self.plain = PlainModel(mar)
            self._forward.set_max_batch_size(max_batch_size)
            self._forward.set_batch_wait_timeout_s(batch_wait_timeout_s)

        async def __call__(self, request: Request):
            s = self.plain.bundle.settings
            try:
                x = self.plain.inputs(parse_json(await request.body(), s.json_limits, s.max_body_bytes))
            except ClientError as err:
                return JSONResponse(err.body(), status_code=err.code)
            return JSONResponse({"predictions": await self._forward(x)})

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def _forward(self, xs: list[torch.Tensor]) -> list[list[dict]]:
            answers = self.plain.answer(torch.cat(xs))
            out, start = [], 0
            for x in xs:
                out.append(answers[start:start + len(x)])
                start += len(x)
            return out

    return PlainIngress


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m selfheal_bench.plain_servers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kserve")
    k.add_argument("--mar", required=True)
    k.add_argument("--host", default="127.0.0.1")
    k.add_argument("--http-port", type=int, required=True)
    args = ap.parse_args(argv)
    return kserve_main(args)


if __name__ == "__main__":
    sys.exit(main())
