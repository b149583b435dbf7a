"""What is wrong now, per component: one place that status, metrics and the header read.

A failure used to be logged and then forgotten: the learner cleared a publish
error in the same round it was set, and a worker whose monitoring broke kept
answering `drift=false`. A `Faults` keeps, per component (`publish`, `log`,
`monitor`, ...), the last error, when it began, when it was last seen and how
often it happened; the error stays until that component next succeeds.
Thread-safe: loops record, HTTP threads and metrics read a copy.
"""
from __future__ import annotations

import threading
import time


class Faults:
    """Open errors by component, with counts that survive their clearing.

    >>> f = Faults()
    >>> f.failed("publish", "no space left")
    True
    >>> f.failed("publish", "no space left"), f.is_open("publish")
    (False, True)
    >>> f.ok("publish")
    >>> f.is_open("publish"), f.snapshot()["publish"]["count"], f.snapshot()["publish"]["error"]
    (False, 2, None)
    """

    def __init__(self, components: tuple[str, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._state: dict[str, dict] = {}  # component -> {"error", "since", "last", "count", "last_error"}
        for component in components:  # known from the start: status and metrics show them at 0
            self._state[component] = self._fresh()

    @staticmethod
    def _fresh() -> dict:
        return {"error": None, "since": None, "last": None, "count": 0, "last_error": None}

    def failed(self, component: str, message: str) -> bool:
        """Record a failure; True when it opens (the component was fine before): log it then."""
        now = time.time()
        with self._lock:
            entry = self._state.setdefault(component, self._fresh())
            opened = entry["error"] is None
            entry.update(error=message[:500], last=now, count=entry["count"] + 1, last_error=message[:500])
            if opened:
                entry["since"] = now
            return opened

    def ok(self, component: str) -> None:
        """The component succeeded: its error is over (its count stays)."""
        with self._lock:
            entry = self._state.get(component)
            if entry is not None and entry["error"] is not None:
                entry.update(error=None, since=None)

    def is_open(self, component: str) -> bool:
        with self._lock:
            entry = self._state.get(component)
            return entry is not None and entry["error"] is not None

    @property
    def open(self) -> list[str]:
        with self._lock:
            return sorted(c for c, e in self._state.items() if e["error"] is not None)

    def snapshot(self) -> dict[str, dict]:
        """A JSON-able copy: component -> error (None when over), since, last, count, last_error."""
        with self._lock:
            return {c: dict(e) for c, e in self._state.items()}
