"""Client errors as the TorchServe adapter knows them: the core's one `ClientError` type
(`RequestError` is its older name here)."""
from __future__ import annotations

from selfheal_core.errors import ERROR_TYPES, ClientError, echo

RequestError = ClientError

__all__ = ["ERROR_TYPES", "ClientError", "RequestError", "echo"]
