"""The `X-Selfheal` response header: what every server adapter sends with an answer.

`version=3; drift=true; detectors=confidence,feature_shift; accuracy=0.874; ids=<id>,<id>`
"""
from __future__ import annotations

# One response header: each extra header cost the TorchServe frontend ~3% of its throughput at batch 1
# (bench_serve, monitor vs plain: one header 0.93, four 0.81). The ids come last, so that
# `sed 's/.*ids=//'` cuts them out.
HEADER = "X-Selfheal"
UNTRUSTED = "untrusted"  # the header's accuracy when no confidence-based estimate can speak
UNKNOWN = "unknown"  # the header's drift when monitoring is failing


def header_value(version: int, drift: dict, ids: list[str], accuracy: float | str | None = None,
                 monitoring: bool = True) -> str:
    """`version=3; drift=true; detectors=confidence,feature_shift; accuracy=0.874; ids=<id>,<id>`
    (accuracy: the live estimate without labels, classifiers only; `untrusted` where it cannot be
    trusted). `monitoring` False: the monitor is failing, so drift is `unknown`, never `false`."""
    detectors = f"; detectors={','.join(drift['firing'])}" if drift["firing"] else ""
    estimate = (f"; accuracy={accuracy}" if isinstance(accuracy, str)
                else f"; accuracy={accuracy:.3f}" if accuracy is not None else "")
    state = UNKNOWN if not monitoring else "true" if drift["detected"] else "false"
    return f"version={version}; drift={state}{detectors}{estimate}; ids={','.join(ids)}"


def parse_header(value: str) -> dict:
    """The X-Selfheal header as {"version", "drift", "detectors", "accuracy", "ids"}; drift is None
    when unknown (monitoring failing), accuracy None when absent or untrusted.

    >>> parse_header("version=3; drift=true; detectors=confidence; accuracy=0.874; ids=a1,b2")
    {'version': 3, 'drift': True, 'detectors': ['confidence'], 'accuracy': 0.874, 'ids': ['a1', 'b2']}
    >>> parse_header("version=3; drift=unknown; accuracy=untrusted; ids=a1")["drift"]
    """
    fields = dict(part.strip().split("=", 1) for part in value.split(";") if "=" in part)
    accuracy = fields.get("accuracy")
    return {"version": int(fields["version"]),
            "drift": None if fields["drift"] == UNKNOWN else fields["drift"] == "true",
            "detectors": [d for d in fields.get("detectors", "").split(",") if d],
            "accuracy": float(accuracy) if accuracy not in (None, UNTRUSTED) else None,
            "ids": [i for i in fields.get("ids", "").split(",") if i]}
