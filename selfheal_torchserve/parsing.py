"""Reading request bodies: JSON with limits, inputs as tensors, targets for feedback."""
from __future__ import annotations

import base64
import json
from typing import Any

import torch

from selfheal_torchserve.errors import RequestError, echo
from selfheal_torchserve.settings import JsonLimits


def _check_depth(text: str, limit: int) -> None:
    """Refuse nesting deeper than `limit` before the parser recurses into it (a 1,000-deep array
    would raise RecursionError inside json.loads, or worse, in the code that walks the result)."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                raise RequestError(400, f"JSON nested deeper than {limit} levels")
        elif ch in "]}":
            depth -= 1


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
