"""Which inputs may reach shared state: the reference's range per feature, widened.

Every client's inputs are folded into statistics that every other client is
then served with (BatchNorm moments, input moments). One request of pixels at
1e18 turned those into inf and every later answer into NaN (red team, issue
26 case A). Inputs far outside what the reference makes plausible are still
answered, but never adapted on, never monitored and never learned from.

"Plausible" is loose on purpose: each feature may lie up to `multiple` times
its reference range beyond either end of that range, so a gain drift (x1.6),
a brightness or contrast change and noise all pass; only values no sensor or
image of that kind produces fail. A feature that is constant on the reference
(an image border) gets the median feature's range instead of none, so noise
on it is not mistaken for an attack.
"""
from __future__ import annotations

import torch


class PlausibleRange:
    """Per-feature bounds from a float reference (R, ...); `check(x)` says which rows lie within.

    >>> import torch
    >>> r = PlausibleRange(torch.rand(100, 4), multiple=3.0)
    >>> r.check(torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 1.6, -0.5, 0.5], [0.5, 1e18, 0.5, 0.5]])).tolist()
    [True, True, False]
    """

    def __init__(self, reference: torch.Tensor, multiple: float) -> None:
        if not reference.is_floating_point():
            raise ValueError("a plausible range needs a floating-point reference")
        if not multiple > 0:
            raise ValueError(f"multiple must be > 0, got {multiple!r}")
        self.multiple = multiple
        flat = reference.detach().reshape(len(reference), -1).to("cpu", torch.float32)  # (R, F)
        lo, hi = flat.min(0).values, flat.max(0).values
        span = hi - lo
        typical = float(span.median()) if float(span.median()) > 0 else float(span.max())
        span = span.clamp_min(typical if typical > 0 else 1.0)  # constant features: the typical span
        self._lo = lo - multiple * span  # (F,) float32: 8 bytes a feature (1.2 MB for 3x224x224)
        self._hi = hi + multiple * span
        # a box inside every feature's bounds: a batch whose values all lie in it passes with one
        # reduction instead of a comparison per value (the common case for images: one scale)
        self._box = (float(self._lo.max()), float(self._hi.min()))
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # bounds per device, made once

    @property
    def nbytes(self) -> int:
        return self._lo.numel() * self._lo.element_size() * 2

    def screen(self, x: torch.Tensor) -> torch.Tensor | None:
        """None when every row of x is plausible (the common case, one reduction), else `check(x)`."""
        low, high = self._box
        if low <= high and x.numel() == len(x) * self._lo.numel() and len(x):
            least, most = torch.aminmax(x)
            if low <= float(least) and float(most) <= high:  # NaN fails both comparisons
                return None
        keep = self.check(x)
        return None if bool(keep.all()) else keep

    def check(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) bool: True where every feature of the row lies within the bounds (NaN fails)."""
        lo, hi = self._on.get(x.device) or self._on.setdefault(x.device, (self._lo.to(x.device),
                                                                          self._hi.to(x.device)))
        flat = x.reshape(len(x), -1)
        if flat.shape[1] != lo.numel():
            return torch.zeros(len(x), dtype=torch.bool, device=x.device)
        return ((flat >= lo) & (flat <= hi)).all(1)
