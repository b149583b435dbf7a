"""Model outputs as JSON answers, the same on every server.

Per input: `{"label", "probabilities"}` for a classifier, `{"label",
"probability"}` for a binary logit, `{"value"}` for regression.
"""
from __future__ import annotations

import torch

from selfheal_core.task import TaskKind


def predictions(outputs: torch.Tensor, kind: TaskKind) -> list[dict]:
    """One JSON entry per row of `outputs` (logits, a logit, or values)."""
    out = outputs.detach().float().cpu()
    if kind is TaskKind.CLASSIFICATION:
        probs = torch.softmax(out, 1)
        return [{"label": int(p.argmax()), "probabilities": [round(float(v), 6) for v in p]} for p in probs]
    if kind is TaskKind.BINARY:
        probs = torch.sigmoid(out.reshape(len(out)))
        return [{"label": int(p > 0.5), "probability": round(float(p), 6)} for p in probs]
    values = out.reshape(len(out), -1)
    return [{"value": float(v[0]) if len(v) == 1 else [float(t) for t in v]} for v in values]
