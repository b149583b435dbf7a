"""The protocol every label-free corrector follows, and what it observes.

A corrector is fed drained batches (`observe`, off the request path) and may
change what the served model computes. Serving state is written only by the
thread that serves: `observe` computes new values and swaps them in by
reference, and `apply()` (called before a forward, on the serving thread)
copies them into the model and registers or removes the part's hooks
(`activate`/`reset` only set flags). So a forward never reads a half-written tensor
and no lock is shared between the two threads.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from selfheal_core.state import StateMixin


@dataclass
class Observation:
    """One drained batch of served predictions, oldest first."""

    raw: torch.Tensor  # (N, ...) raw model outputs, before any output correction
    probs: torch.Tensor | None = None  # (N, C) class probabilities (classifiers)
    features: torch.Tensor | None = None  # (N, F) float64 on the CPU: head inputs (or pooled inputs)
    inputs: torch.Tensor | None = None  # (N, ...) model inputs, kept only when a corrector needs them
    fired: list[str] = field(default_factory=list)  # detectors that alarmed on this batch, in order


# The few array functions the per-channel moment arithmetic needs, for torch tensors and for NumPy
# arrays. A served forward folds its BatchNorm inputs layer by layer (norm_stats.py): some forty
# elementwise operations on vectors of tens of channels per layer, where each call's overhead is the
# cost. On the CPU they run on NumPy views of the same memory, whose calls cost about a third of
# torch's: a forward with folding at batch 1, digits CNN 0.80 -> 0.62 ms (plain forward 0.19),
# ResNet-20 10.3 -> 8.0 ms (plain 3.5); on an accelerator they stay tensors on the device.
_TORCH = SimpleNamespace(clamp_min=torch.clamp_min, log=torch.log, exp=torch.exp, stack=torch.stack,
                         ones_like=torch.ones_like, tiny=lambda a: torch.finfo(a.dtype).tiny)
_NUMPY = SimpleNamespace(clamp_min=np.maximum, log=np.log, exp=np.exp, stack=np.stack,
                         ones_like=np.ones_like, tiny=lambda a: np.finfo(a.dtype).tiny)


def array_ops(like) -> SimpleNamespace:
    """The functions of `like`'s kind: a NumPy array's or a torch tensor's."""
    return _NUMPY if isinstance(like, np.ndarray) else _TORCH


def ema_weights(n: int, momentum: float, like: torch.Tensor | np.ndarray) -> tuple[torch.Tensor | np.ndarray, float]:
    """A per-sample EMA over n samples in one step: (weights of samples 0..n-1, oldest first, as
    m (1-m)^(n-1-k); the old estimate's weight (1-m)^n), of `like`'s kind, dtype and device."""
    keep = 1.0 - momentum
    if isinstance(like, np.ndarray):
        return _numpy_ema_weights(n, momentum, like.dtype), keep ** n
    steps = torch.arange(n - 1, -1, -1, dtype=like.dtype, device=like.device)
    return momentum * keep ** steps, keep ** n


@functools.lru_cache(maxsize=256)
def _numpy_ema_weights(n: int, momentum: float, dtype: np.dtype) -> np.ndarray:
    """ema_weights' NumPy vector, built once per batch size (a served forward asks for it in every
    BatchNorm layer); read-only, as it is shared."""
    w = momentum * (1.0 - momentum) ** np.arange(n - 1, -1, -1, dtype=dtype)
    w.flags.writeable = False
    return w


def shrink_to_source(mean: torch.Tensor, var: torch.Tensor, src_mean: torch.Tensor, src_var: torch.Tensor,
                     momentum: float, noise_se: float, spread: torch.Tensor | None = None,
                     var_spread: torch.Tensor | float = 2.0, src_count: int | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Live moments (per feature or channel) pulled back to the source's where they differ from
    them by about their own estimation noise.

    A per-sample EMA with weight m carries m / (2 - m) of one sample's variance, so on inputs
    that did not move at all its mean is off by ~sqrt(spread * m / (2 - m)) and its
    log-variance by ~sqrt(var_spread * m / (2 - m)). `spread`: the variance of one sample's
    mean statistic (default `var`: one value per sample, as for inputs; a convolution's channel
    averages a whole feature map per sample and varies far less); `var_spread`: the relative
    variance of one sample's variance statistic (2 for one Gaussian value); `src_count`: how
    many samples the source moments were measured on, if few enough for their own error to
    count (a reference sample of a few hundred is off by as much as the EMA). Adopted as they
    are, those errors cost accuracy whenever adaptation runs on an unchanged input
    distribution: a false alarm, or a concept change that moved the labels but not the inputs
    (measured on bench_tabular's hyperplane and friedman streams: label-free 0.7 points and
    0.5 MSE worse than the static model). Each difference d is scaled by
    max(0, 1 - (noise_se * se / d)^4): within noise_se standard errors it goes, at twice that
    94% of it stays, at three times 99%. The square (James-Stein, the non-negative garrote)
    would still take 18% of a shift of 7 standard errors, and the corruptions the adapters exist
    for sit in that range in some channels (bench_heal: continual error +0.5 points with it).
    noise_se 0 adopts the live moments unchanged.
    """
    if noise_se <= 0:
        return mean, var
    keep, keep_r = shrink_factors(mean, var, src_mean, src_var, momentum, noise_se, spread, var_spread, src_count)
    return shrunk(mean, var, src_mean, src_var, keep, keep_r)


def shrink_factors(mean, var, src_mean, src_var, momentum: float, noise_se: float, spread=None,
                   var_spread=2.0, src_count: int | None = None) -> tuple:
    """`shrink_to_source`'s two factors: the share of the difference in mean, and of the log-ratio of
    variances, that is kept (each per feature, in [0, 1]; `noise_se` > 0)."""
    xp = array_ops(mean)  # tensors, or NumPy arrays (the served forward's folds on the CPU)
    c = momentum / (2.0 - momentum)
    tiny = xp.tiny(mean)
    d = mean - src_mean
    src = 1.0 / src_count if src_count else 0.0
    noise = c * (var if spread is None else spread)
    if src:
        noise = noise + src * src_var
    k = noise_se ** 2
    keep = xp.clamp_min(1.0 - (k * noise / xp.clamp_min(d * d, tiny)) ** 2, 0.0)
    r = xp.log(var / src_var)
    keep_r = xp.clamp_min(1.0 - (k * (c * var_spread + 2.0 * src) / xp.clamp_min(r * r, tiny)) ** 2, 0.0)
    return keep, keep_r


def shrunk(mean, var, src_mean, src_var, keep, keep_r) -> tuple:
    """Live moments with `shrink_factors`' shares of their differences from the source kept."""
    xp = array_ops(mean)
    return src_mean + (mean - src_mean) * keep, src_var * xp.exp(xp.log(var / src_var) * keep_r)


class SampleBuffer:
    """Samples accumulated across requests until an adaptation step is due (batch size 1 works)."""

    def __init__(self, every: int, keep: int) -> None:
        self.every, self.keep = every, keep  # samples per step; newest samples a step uses at most
        self.clear()

    def clear(self) -> None:
        self._parts: list[torch.Tensor] = []
        self._pending = 0

    def add(self, x: torch.Tensor) -> torch.Tensor | None:
        """Buffer x (B, ...); the newest `keep` samples once `every` have arrived (then empty)."""
        self._parts.append(x)
        self._pending += len(x)
        if self._pending < self.every:
            return None
        batch = torch.cat(self._parts)[-self.keep:]
        self.clear()
        return batch


class Corrector(StateMixin):
    """Shared life cycle: enabled (the model has something to adapt), active, reset to source."""

    name = "corrector"
    needs_inputs = False  # whether `observe` needs Observation.inputs

    def __init__(self) -> None:
        self._active = False

    @property
    def enabled(self) -> bool:
        return True

    @property
    def active(self) -> bool:
        return self._active

    def activate(self) -> None:
        self._active = True

    def deactivate(self) -> None:
        self._active = False

    def observe(self, obs: Observation) -> None:
        """Adapt on a drained batch (background thread); serving tensors are not touched here."""

    def apply(self) -> None:
        """Copy the newest adapted values into the served model (serving thread)."""

    def reset(self) -> None:
        """Back to the source model exactly, inactive."""
        raise NotImplementedError

    def rebase(self, weights: dict[str, torch.Tensor]) -> None:
        """A new version's weights were installed: adapt from them from now on (serving thread)."""

    def finite(self) -> bool:
        """Whether everything this part serves is finite (False: it is reset at once)."""
        return True

    def status(self) -> dict:
        return {"active": self._active}
