"""selfheal's state as TorchServe metrics: exported on the metrics port with metrics_mode=prometheus.

TorchServe exports a model metric to Prometheus only when its metrics config
declares it: give TorchServe `selfheal_torchserve/metrics.yaml` as `metrics_config`
(`selfheal paths` prints where it is installed). The gauges are written every few
seconds by each worker's background thread (not per request: a metric line costs
the worker and the frontend a log line each), labelled by ModelName (and Detector
for drift scores).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

METRICS_YAML = Path(__file__).with_name("metrics.yaml")
GAUGES = ("selfheal_drift", "selfheal_drift_score", "selfheal_drift_episodes", "selfheal_model_version",
          "selfheal_accuracy_estimated", "selfheal_accuracy_observed", "selfheal_shed_predictions",
          "selfheal_feedback_accepted", "selfheal_feedback_quarantined", "selfheal_feedback_refused",
          "selfheal_updates_accepted", "selfheal_updates_rolled_back", "selfheal_learner_lag",
          "selfheal_label_delay_p50", "selfheal_label_delay_p99", "selfheal_snapshot_age",
          "selfheal_concept_suspected", "selfheal_accuracy_trusted", "selfheal_errors", "selfheal_error_open",
          "selfheal_implausible_inputs", "selfheal_dropped", "selfheal_inputs_atypical")
DIMENSIONS = {"selfheal_drift_score": ["Detector"], "selfheal_errors": ["Component"], "selfheal_error_open": ["Component"],
              "selfheal_dropped": ["Buffer"]}
UNITS = {"selfheal_accuracy_estimated": "percent", "selfheal_accuracy_observed": "percent",
         "selfheal_inputs_atypical": "percent",
         "selfheal_label_delay_p50": "s", "selfheal_label_delay_p99": "s", "selfheal_snapshot_age": "s"}


class MetricsEmitter:
    """Gauges built once (on the thread that initialises the worker), updated from the background one."""

    def __init__(self, cache, model_name: str) -> None:
        from ts.metrics.metric_type_enum import MetricTypes

        self.model_name = model_name
        self._gauges = {}
        declared = True
        for name in GAUGES:
            dims = ["ModelName", "Level", *DIMENSIONS.get(name, [])]
            try:
                self._gauges[name] = cache.get_metric(name, MetricTypes.GAUGE)
            except Exception:  # not in the metrics config: logged, but not exported to Prometheus
                declared = False
                self._gauges[name] = cache.add_metric_to_cache(name, UNITS.get(name, "count"), dims, MetricTypes.GAUGE)
        if not declared:
            log.warning("selfheal's metrics are not in TorchServe's metrics config, so Prometheus will not show them: "
                        "set metrics_config=%s in config.properties", METRICS_YAML)

    def _set(self, name: str, value, *extra: str) -> None:
        if value is None:
            return
        self._gauges[name].add_or_update(float(value), [self.model_name, "Model", *extra])

    def emit(self, serving: dict, drift: dict, learner: dict | None, published_at: float | None,
             estimated: float | str | None, faults: dict | None = None, dropped: dict | None = None) -> None:
        """One sample of every gauge: the worker's serving status, its merged drift, the learner's record,
        every component's failures and what full buffers dropped (`estimated` "untrusted": no estimate
        is exported, trusted 0)."""
        trusted = not isinstance(estimated, str)
        estimated = estimated if trusted else None
        self._set("selfheal_accuracy_trusted", int(trusted))
        self._set("selfheal_implausible_inputs", serving["counters"].get("implausible", 0))
        atypical = (serving.get("accuracy") or {}).get("atypical_share")
        self._set("selfheal_inputs_atypical", None if atypical is None else 100 * atypical)
        for buffer, count in (dropped or {}).items():
            self._set("selfheal_dropped", count, buffer)
        for source in (faults or {}, (learner or {}).get("faults") or {}):
            for component, entry in source.items():
                self._set("selfheal_errors", entry["count"], component)
                self._set("selfheal_error_open", int(entry["error"] is not None), component)
        self._set("selfheal_drift", int(bool(drift.get("detected"))))
        for detector, score in drift.get("scores", {}).items():
            self._set("selfheal_drift_score", score, detector)
        self._set("selfheal_drift_episodes", serving["drift"]["episodes"])
        self._set("selfheal_model_version", serving["version"])
        self._set("selfheal_shed_predictions", serving["counters"]["shed"])
        self._set("selfheal_accuracy_estimated", None if estimated is None else 100 * estimated)
        if published_at:
            self._set("selfheal_snapshot_age", time.time() - published_at)
        if not learner or "counters" not in learner:
            return
        observed = (learner.get("accuracy") or {}).get("observed")
        self._set("selfheal_accuracy_observed", None if observed is None else 100 * observed)
        by_status = (learner.get("log") or {}).get("by_status", {})
        self._set("selfheal_feedback_accepted", (learner.get("log") or {}).get("entries"))
        self._set("selfheal_feedback_quarantined", sum(by_status.get(k, 0) for k in ("held", "quarantined",
                                                                                     "discarded")))
        self._set("selfheal_feedback_refused", (learner.get("intake") or {}).get("refused"))
        self._set("selfheal_updates_accepted", learner["counters"].get("updates"))
        self._set("selfheal_updates_rolled_back", learner["counters"].get("rolled_back"))
        self._set("selfheal_learner_lag", learner.get("lag"))
        delay = learner.get("label_delay") or {}
        self._set("selfheal_label_delay_p50", delay.get("p50_s"))
        self._set("selfheal_label_delay_p99", delay.get("p99_s"))
        self._set("selfheal_concept_suspected", len((learner.get("concept") or {}).get("suspected", [])))
        self._set("selfheal_dropped", (learner.get("concept") or {}).get("dropped"), "held")
