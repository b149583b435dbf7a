"""Large float inputs held for long (the learner's replay and its reference) kept at half precision.

A 3x224x224 image is 602 kB in float32: the learner's replay of 222 of them and a reference of
128 were 200 MB of a 224x224 ResNet-18's learner. Half precision keeps 11 significant bits, below
what an image decoded from 8 bits carries, so the model reads the same image; inputs are widened
back to the dtype they came in before any forward. Small inputs (digits, tabular rows) stay exact:
they cost little, and a tabular feature may need more than 11 bits (a timestamp, an amount).
"""
from __future__ import annotations

import torch

HALF_FROM_BYTES = 64 * 2 ** 10  # rows of this many bytes or more are kept at half precision
HALF_MAX = float(torch.finfo(torch.float16).max)


def compact(x: torch.Tensor) -> torch.Tensor:
    """x (B, ...) as it is kept: float16 when x is float32 or float64, its rows are
    `HALF_FROM_BYTES` or more, and every value is finite within float16's range (else x itself,
    so nothing becomes inf)."""
    if x.dtype not in (torch.float32, torch.float64) or not len(x):
        return x
    if x[0].numel() * x.element_size() < HALF_FROM_BYTES:
        return x
    if not bool(torch.isfinite(x).all()) or float(x.abs().max()) > HALF_MAX:
        return x
    return x.to(torch.float16)


def widen(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x kept by `compact`, back at the dtype it came in (no copy when it already is)."""
    return x if x.dtype == dtype else x.to(dtype)
