"""Reading request bodies: JSON with limits, numeric instances as input tensors (any server)."""
from __future__ import annotations

import base64
import json
import math
import re
from typing import Any

import numpy as np
import torch

from selfheal_core.errors import ClientError as RequestError, echo
from selfheal_serving.settings import JsonLimits


# a JSON string (escapes included), and everything that is not a bracket
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = np.zeros(256, np.int8)
_STEP[[ord("["), ord("{")]], _STEP[[ord("]"), ord("}")]] = 1, -1


def _check_depth(text: str, limit: int) -> None:
    """Refuse nesting deeper than `limit` before the parser recurses into it (a 1,000-deep array
    would raise RecursionError inside json.loads, or worse, in the code that walks the result).
    Strings are cut out and the brackets left are summed in C: a walk over the text in Python
    cost more than json.loads itself (about 140 us of a digit's 1 kB body). An unterminated string
    stays in, so its brackets count: such a body is refused either way."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if len(brackets) <= limit:
        return
    depth = np.cumsum(_STEP[np.frombuffer(brackets.encode("ascii"), np.uint8)], dtype=np.int64)
    if int(depth.max()) > limit:
        raise RequestError(400, f"JSON nested deeper than {limit} levels")


def parse_json(raw: bytes | bytearray | str, limits: JsonLimits, max_bytes: int) -> Any:
    """Parsed JSON within the limits; RequestError(400/413) naming what is wrong."""
    if len(raw) > max_bytes:
        raise RequestError(413, f"request body of {len(raw)} bytes exceeds the limit of {max_bytes}")
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(400, "body is not valid JSON: not UTF-8 text") from None
    if any(ch in raw for ch in "[{"):  # scalars cannot nest
        _check_depth(raw, limits.max_depth)

    def number(text: str, kind):
        if len(text) > limits.max_number_chars:
            raise RequestError(400, f"a number in the body has {len(text)} characters (limit "
                                    f"{limits.max_number_chars})")
        return kind(text)

    def check_strings(obj: dict) -> dict:
        for k, v in obj.items():
            if isinstance(v, str) and len(v) > limits.max_string_chars:
                raise RequestError(400, f"string field {echo(k)} has {len(v)} characters (limit "
                                        f"{limits.max_string_chars})")
        return obj

    try:
        return json.loads(raw, parse_int=lambda t: number(t, int), parse_float=lambda t: number(t, float),
                          object_hook=check_strings)
    except RequestError:
        raise
    except (ValueError, RecursionError) as exc:
        raise RequestError(400, f"body is not valid JSON: {echo(str(exc), 120)}") from None


def body_of(row: dict) -> Any:
    """The payload of one TorchServe request: the raw body, or the first form field (multipart)."""
    for key in ("body", "data"):
        if row.get(key) is not None:
            return row[key]
    for value in row.values():  # multipart/form-data: one entry per field, under the field's name
        if isinstance(value, (bytes, bytearray)):
            return value
    return None


def json_body(row: dict, limits: JsonLimits, max_bytes: int) -> Any:
    """The request's JSON document. TorchServe hands over parsed JSON (content type
    application/json) or bytes; bytes are parsed here, with the limits."""
    body = body_of(row)
    if body is None:
        raise RequestError(400, "empty request body")
    if isinstance(body, (bytes, bytearray, str)):
        return parse_json(body, limits, max_bytes)
    return body


def as_tensor(value: Any, dtype: torch.dtype, what: str = "inputs") -> torch.Tensor:
    """A numeric tensor from nested lists; RequestError naming the problem."""
    if isinstance(value, dict) and set(value) == {"b64"}:
        raise RequestError(400, f"{what}: base64 inputs need a handler that decodes them (e.g. images)")
    if _has_bool(value):  # torch.tensor takes true as 1: a client's type error must not become data
        raise RequestError(400, f"{what} must be numbers, not true or false")
    try:
        return torch.tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise RequestError(400, f"{what} must be numeric arrays of equal shape") from None


def decode_b64(value: Any) -> bytes:
    """{"b64": "..."} (the KServe v1 convention for binary data) as bytes."""
    if not isinstance(value, dict) or not isinstance(value.get("b64"), str):
        raise RequestError(400, 'binary inputs must be {"b64": "<base64>"}')
    try:
        return base64.b64decode(value["b64"], validate=True)
    except ValueError:
        raise RequestError(400, "b64: not valid base64") from None


def _has_bool(value: Any) -> bool:
    """Whether a nested list holds a JSON boolean (one pass; lists of numbers are checked by type)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, bool):
            return True
        if isinstance(v, list):
            if v and isinstance(v[0], list):
                stack.extend(v)
            elif any(type(e) is bool or isinstance(e, list) for e in v):
                stack.extend(e for e in v if isinstance(e, (bool, list)))
    return False


FEEDBACK_KEYS = frozenset({"feedback", "labels", "targets"})  # labels sent where inference is served


def refuse_feedback(body: Any, where: str) -> None:
    """Labels sent to an inference route: 403 saying where feedback is taken (`where`, e.g. "on
    /feedback/m, with the management key"); nothing of the request is served or learned.

    >>> refuse_feedback({"instances": [[0.5]]}, "on /feedback/m")
    >>> try:
    ...     refuse_feedback({"instances": [[0.5]], "labels": [3]}, "on /feedback/m")
    ... except RequestError as err:
    ...     print(err.code, err.message)
    403 feedback is taken on /feedback/m
    """
    if isinstance(body, dict) and FEEDBACK_KEYS & set(body):
        raise RequestError(403, f"feedback is taken {where}")


def request_inputs(body: Any, shape: tuple[int, ...] | None, dtype: torch.dtype, max_instances: int) -> torch.Tensor:
    """An inference request's inputs as (N, *shape): `{"instances": [x, ...]}` (KServe v1),
    `{"data": x}` (also "input", "inputs"), or a bare array (one input, or a batch when it has one
    more dimension than an input); ClientError (400/413) naming the problem."""
    if isinstance(body, dict):
        if "instances" in body:
            values = body["instances"]
            if not isinstance(values, list) or not values:
                raise RequestError(400, '"instances" must be a non-empty list of inputs')
            if len(values) > max_instances:
                raise RequestError(413, f"{len(values)} inputs exceed the limit of {max_instances}")
            return _checked(shaped(as_tensor(values, dtype), shape, batch=True), max_instances)
        for key in ("data", "input", "inputs"):
            if key in body:
                return _checked(shaped(as_tensor(body[key], dtype), shape, batch=False), max_instances)
        raise RequestError(400, 'body needs "instances": [x, ...] or "data": x')
    if isinstance(body, list):
        return _checked(shaped(as_tensor(body, dtype), shape, batch=None), max_instances)
    raise RequestError(400, 'body must be a JSON array or object: {"instances": [...]} or {"data": x}')


def shaped(x: torch.Tensor, shape: tuple[int, ...] | None, batch: bool | None) -> torch.Tensor:
    """x as (N, *shape): a single input gains the batch dimension; unit dimensions the input
    shape has (an 8x8 image for a (1, 8, 8) model) are added. `batch`: x is a batch (True), one
    input (False), or either (None)."""
    if shape is None:
        return x if batch else x.unsqueeze(0)
    squeezed = tuple(d for d in shape if d != 1)
    if batch is not False and tuple(x.shape[1:]) in (shape, squeezed) and x.dim() >= 1:
        return x.reshape(len(x), *shape)
    if batch is not True and tuple(x.shape) in (shape, squeezed):
        return x.reshape(1, *shape)
    raise RequestError(400, f"inputs must have shape {list(shape)} (or a list of them), got "
                            f"{list(x.shape[1:] if batch else x.shape)}")


def _checked(x: torch.Tensor, max_instances: int) -> torch.Tensor:
    if len(x) > max_instances:
        raise RequestError(413, f"{len(x)} inputs exceed the limit of {max_instances}")
    if x.is_floating_point() and not math.isfinite(float(x.sum())) and not torch.isfinite(x).all():
        raise RequestError(400, "inputs contain NaN or inf")
    return x
