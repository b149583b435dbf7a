"""selfheal's state as Ray metrics (`ray.util.metrics`): exported by Ray's own Prometheus endpoint
on every node, tagged by model and replica."""
from __future__ import annotations


class RayMetrics:
    """The runtime's `MetricsSink` over Ray gauges (built in the replica, updated every status interval)."""

    def __init__(self, model: str, replica: str) -> None:
        from ray.util.metrics import Gauge

        tags = ("model", "replica")
        self._tags = {"model": model, "replica": replica}
        self._gauges = {name: Gauge(f"selfheal_{name}", description=text, tag_keys=tags + extra)
                        for name, text, extra in (
                            ("drift", "1 while a drift episode lasts", ()),
                            ("model_version", "the published version served", ()),
                            ("accuracy_estimated", "live accuracy estimate without labels (-1: untrusted)", ()),
                            ("inputs_atypical", "share of recent inputs unlike the reference", ()),
                            ("error_open", "1 while a component's failure lasts", ("component",)),
                            ("dropped", "what a full buffer dropped", ("buffer",)))}

    def _set(self, name: str, value: float, **extra: str) -> None:
        self._gauges[name].set(float(value), tags={**self._tags, **extra})

    def emit(self, status: dict, drift: dict, learner: dict | None, published_at: float | None,
             estimate: float | str | None, faults: dict, dropped: dict[str, int]) -> None:
        self._set("drift", bool(drift.get("detected")))
        self._set("model_version", status.get("version", 0))
        if estimate is not None:
            self._set("accuracy_estimated", -1.0 if isinstance(estimate, str) else estimate)
        atypical = (status.get("accuracy") or {}).get("atypical_share")
        if atypical is not None:
            self._set("inputs_atypical", atypical)
        for component, fault in faults.items():
            self._set("error_open", bool(fault.get("error")), component=component)
        for buffer, count in dropped.items():
            self._set("dropped", count, buffer=buffer)
