"""Large float inputs held for long (the learner's replay, held-back labels and reference) kept
small, and read back at the dtype they came in.

A 3x224x224 image is 602 kB in float32: the learner's replay of 222 of them and a reference of
128 were 200 MB of a 224x224 ResNet-18's learner. Two forms, the smaller that fits:
- an image decoded from 8 bits and scaled to [0, 1] (`k / 255`: PIL or torchvision's ToTensor) is
  its bytes again, one per value, and reads back bit for bit (checked when kept: 151 kB);
- any other finite input within float16's range at half precision: 11 significant bits, below
  what an image decoded from 8 bits carries, so the model reads the same image (301 kB).
Inputs are widened back to the dtype they came in before any forward (`widen`). Small inputs
(digits, tabular rows) stay exact: they cost little, and a tabular feature may need more than
11 bits (a timestamp, an amount).
"""
from __future__ import annotations

import torch

HALF_FROM_BYTES = 64 * 2 ** 10  # rows of this many bytes or more are kept compact
HALF_MAX = float(torch.finfo(torch.float16).max)
LEVELS = 255  # an 8-bit image's values, k / LEVELS
_CHUNK = 16  # rows checked at a time: the check's temporaries stay a few of them


def compact(x: torch.Tensor) -> torch.Tensor:
    """x (B, ...) as it is kept: when x is float32 or float64 and its rows are `HALF_FROM_BYTES`
    or more, uint8 if every value is exactly k / 255, else float16 if every value is finite
    within float16's range, else x itself (nothing becomes inf)."""
    if x.dtype not in (torch.float32, torch.float64) or not len(x):
        return x
    if x[0].numel() * x.element_size() < HALF_FROM_BYTES:
        return x
    levels = _as_levels(x)
    if levels is not None:
        return levels
    if not bool(torch.isfinite(x).all()) or float(x.abs().max()) > HALF_MAX:
        return x
    return x.to(torch.float16)


def keep(x: torch.Tensor) -> torch.Tensor:
    """One input (...) as a buffer holds it: `compact`, and never a view into the batch it came in
    (copied where `compact` left it as it was)."""
    kept = compact(x.unsqueeze(0))[0]
    return kept.clone() if kept.dtype == x.dtype else kept


def _as_levels(x: torch.Tensor) -> torch.Tensor | None:
    """x as uint8 levels k with k / 255 == x exactly (at x's dtype), else None."""
    out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    for i in range(0, len(x), _CHUNK):
        xb = x[i:i + _CHUNK]
        k = torch.round(xb * LEVELS)
        if not bool(((k >= 0) & (k <= LEVELS)).all()):  # also false for NaN
            return None
        out[i:i + _CHUNK] = k.to(torch.uint8)
        if not torch.equal(widen(out[i:i + _CHUNK], x.dtype), xb):
            return None
    return out


def widen(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x kept by `compact`, back at the dtype it came in (no copy when it already is). Only
    `compact` makes uint8 of a float input: uint8 asked back as a float is levels k / 255."""
    if x.dtype == dtype:
        return x
    if x.dtype == torch.uint8 and dtype.is_floating_point:
        return x.to(dtype) / LEVELS
    return x.to(dtype)
