"""Client errors: a status code and an ASCII message naming the problem, for one request alone.

One type for every server: the intake, the serving runtime and each adapter
raise `ClientError`, and an adapter turns it into its server's response.
TorchServe's worker protocol sends a reason phrase's length in characters but
its bytes in UTF-8, so a non-ASCII phrase desynchronises the stream and kills
the worker; every message here is escaped to printable ASCII, and anything
echoed from a request is cut short.
"""
from __future__ import annotations

from selfheal_core.storage.base import ascii_safe

ERROR_TYPES = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed", 409: "Conflict",
               413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "UnprocessableEntity",
               503: "ServiceUnavailable", 504: "GatewayTimeout", 507: "InsufficientStorage"}


class ClientError(Exception):
    """Raise from preprocess (or anywhere in a request) to answer that request alone with `code`.

    >>> err = ClientError(400, "bad pixel: caf\\u00e9")
    >>> err.code, err.message
    (400, 'bad pixel: caf\\\\xe9')
    """

    def __init__(self, code: int, message: str) -> None:
        self.code = int(code)
        self.message = ascii_safe(message, 1_000)
        super().__init__(self.message)

    def body(self) -> dict:
        return {"code": self.code, "type": ERROR_TYPES.get(self.code, "Error"), "message": self.message}

    @property
    def phrase(self) -> str:
        """The HTTP reason phrase: one short ASCII line."""
        return self.message.replace("\n", " ")[:200]


def echo(value, limit: int = 40) -> str:
    """A value from a request, safe to put into a message."""
    return ascii_safe(repr(value), limit)
