"""One TorchServe batch, request by request: what a request cannot get through answers it alone.

TorchServe hands a handler a batch of requests and expects one answer per request; BaseHandler's
`handle` preprocesses the batch at once, so one unreadable request fails them all (503). Here
`preprocess` and `postprocess` run per request, inference once on everything readable; a
`RequestError` (or any exception from the base's preprocess) becomes that request's 4xx.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from selfheal_torchserve.errors import RequestError

log = logging.getLogger(__name__)


def refuse(context, idx: int, err: RequestError) -> dict:
    """Answer request `idx` with the error's status, an ASCII reason phrase and a JSON body."""
    context.set_response_status(err.code, err.phrase, idx)
    context.set_response_content_type(idx, "application/json")
    return err.body()


def per_request(handler, data: list[dict], context,
                check: Callable[[Any], torch.Tensor] = lambda x: x,
                answer: Callable[[int, Any, slice, torch.Tensor, torch.Tensor], Any] | None = None) -> list[Any]:
    """Run the batch through handler.preprocess / inference / postprocess, request by request.

    `check(x)` validates one request's preprocessed tensor (RequestError to refuse it);
    `answer(idx, response, rows, outputs, inputs)` may decorate a request's response (rows: its
    slice of the batch's outputs and inputs).
    """
    outputs: list[Any] = [None] * len(data)
    batch: list[tuple[int, torch.Tensor]] = []
    for idx, row in enumerate(data):
        try:
            batch.append((idx, check(handler.preprocess([row]))))
        except RequestError as err:
            outputs[idx] = refuse(context, idx, err)
        except Exception as exc:  # the base's preprocess could not read this request
            log.warning("request %d could not be read: %s: %s", idx, type(exc).__name__, exc)
            outputs[idx] = refuse(context, idx, RequestError(
                400, f"could not read the request: {type(exc).__name__}: {exc}"))
    if not batch:
        return outputs
    inputs = torch.cat([x for _, x in batch])
    outs = handler.inference(inputs)
    start = 0
    for idx, x in batch:
        rows = slice(start, start + len(x))
        start += len(x)
        try:
            response = handler.postprocess(outs[rows])
        except RequestError as err:
            outputs[idx] = refuse(context, idx, err)
            continue
        except Exception as exc:
            log.exception("postprocess failed for request %d", idx)
            outputs[idx] = refuse(context, idx, RequestError(500, f"postprocess failed: {type(exc).__name__}"))
            continue
        if len(x) == 1 and isinstance(response, list) and len(response) == 1:
            response = response[0]  # TorchServe answers a one-input request with its entry
        outputs[idx] = answer(idx, response, rows, outs, inputs) if answer else response
    return outputs
