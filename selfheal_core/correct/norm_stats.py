"""Normalisation-statistics adaptation that works at request batch size 1.

BatchNorm layers normalise with running statistics estimated on training data;
under covariate shift those are wrong (Schneider et al. 2020). Instead of batch
statistics (useless for one input), each BN layer's input moments are folded
into a per-sample exponential moving average across requests, starting from
the source statistics, and written into `running_mean` / `running_var`.

The moments are folded inside the served forward itself, layer by layer, by a
forward pre-hook (RoTTA's robust BatchNorm does the same): each layer folds
its batch's per-sample moments into its EMA and normalises the batch with the
result. The batch's own share is 1 - (1 - momentum)^B: 1% at batch 1, 47% at
batch 64. Every layer's input is then what the layers before it make of this
batch with statistics that already include it, so the layers' estimates agree.
Folded afterwards from inputs kept during forwards normalised with earlier
statistics (as before), each layer's input came through layers whose
statistics were about to change: on a ResNet-20 (19 BatchNorm layers) the
estimates chased each other and the served error swung between 0.1 and 0.97
within one Fashion-MNIST-C domain, at batch 1 ending far above the unadapted
model's (zoom blur: 0.22 source, 0.85 adapted; now 0.13); the 2-layer digits
CNN never showed it.

The serving thread owns the moments: only the hooks (inside its forward) and
`apply` (before it) change them; `reset` from another thread is carried out at
the next `apply`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from selfheal_core.correct.base import Corrector, Observation, array_ops, ema_weights, shrink_to_source


class NormStatsAdapter(Corrector):
    """EMA of BatchNorm input moments from live traffic (a no-op for models without BN)."""

    name = "norm_stats"
    _state_keys = ("_mean", "_sq", "_noise", "_active", "_samples")

    def __init__(self, layers: tuple[nn.Module, ...] | list[nn.Module], momentum: float = 0.01,
                 noise_se: float = 2.0) -> None:
        if not 0 < momentum <= 1:
            raise ValueError(f"need momentum in (0, 1], got {momentum}")
        super().__init__()
        self.momentum = momentum
        self.noise_se = noise_se  # live moments this close to the source's are taken as noise
        self._reset_pending = False  # a reset asked for off the serving thread, done at the next apply()
        self._layers = list(layers)
        self._source = [(m.running_mean.clone(), m.running_var.clone()) for m in self._layers]
        # the source variances as the layers floor them: fixed, so floored once, not in every forward
        self._source_var = [var.clamp_min(m.eps) for (_, var), m in zip(self._source, self._layers)]
        self._recording = False
        self._keep: torch.Tensor | None = None  # rows of the forward being recorded that may be folded
        self._hooks: list = []  # registered only while adapting: an idle hook still costs every forward
        self._reset()

    def _reset(self) -> None:
        self._mean = [mu.clone() for mu, _ in self._source]  # per layer (C,); replaced, never changed in place
        self._sq = [var + mu ** 2 for mu, var in self._source]  # second moment per layer (C,)
        # their noise, per layer (3, C): EMAs of z^2, q^2 and z q, where z and q are one sample's mean
        # and mean square about the source mean; started where one Gaussian value per sample would
        # put them (the most noise a feature map can have)
        self._noise = self._reset_noise()
        self._stats = self._source  # per layer (mean, var) that apply() writes: the source until adapted
        self._active = False
        self._samples = 0  # samples folded in since activation
        self._folded = 0  # rows the forward being recorded folded
        self._folding: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._applied: object = None  # the moments last written into the layers

    def _reset_noise(self) -> list[torch.Tensor]:
        return [torch.stack([var, 3 * var ** 2, torch.zeros_like(var)]) for _, var in self._source]

    def _make_hook(self, i: int):
        def hook(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if self._recording:
                x = inputs[0].detach()  # (B, C, ...)
                keep = self._keep
                if keep is not None:
                    if not bool(keep.any()):
                        return
                    x = x[keep]  # rows outside the plausible range never reach the statistics
                self._fold(i, layer, x)
        return hook

    def _fold(self, i: int, layer: nn.Module, x: torch.Tensor) -> None:
        """Serving thread, inside the forward: fold the batch's per-sample moments into layer i's EMA
        and normalise the batch with the result. The per-channel arithmetic runs on NumPy views
        on the CPU (base.array_ops: a call's overhead is the cost here) and on tensors elsewhere;
        the moments are new arrays each time, never changed in place."""
        dims = list(range(2, x.dim()))
        mean = x.mean(dims) if dims else x  # per-sample moments (N, C)
        sq = (x * x).mean(dims) if dims else x * x
        n = len(x)
        as_array, as_tensor = _arithmetic(mean)
        mean, sq = as_array(mean), as_array(sq)
        if n == 1:  # batch 1, the common serving case: no weight vector to build
            w, old = None, 1.0 - self.momentum
        else:
            w, old = ema_weights(n, self.momentum, mean)
        xp = array_ops(mean)

        def fold(prev: torch.Tensor, values) -> torch.Tensor:  # values (N, ...) -> prev's shape
            return as_array(prev) * old + (self.momentum * values[0] if w is None else xp.tensordot(w, values, 1))

        src_mu, src_var = as_array(self._source[i][0]), as_array(self._source_var[i])
        z = mean - src_mu  # about a fixed centre, so folding a batch at once equals one sample at a time
        q = sq - 2 * src_mu * mean + src_mu * src_mu
        moments = (fold(self._mean[i], mean), fold(self._sq[i], sq),
                   fold(self._noise[i], xp.stack([z * z, q * q, z * q], 1)))
        mu, var = self._adapted_moments(*moments, src_mu, src_var, layer.eps)
        self._mean[i], self._sq[i], self._noise[i] = (as_tensor(m) for m in moments)
        mu, var = as_tensor(mu), as_tensor(var)
        layer.running_mean.copy_(mu)
        layer.running_var.copy_(var)
        self._folding[i] = (mu, var)
        self._folded = max(self._folded, n)

    @property
    def enabled(self) -> bool:
        return bool(self._layers)

    def activate(self) -> None:
        self._active = True  # the hooks follow at the next apply(), on the serving thread

    def sync_hooks(self) -> None:
        """Serving thread: capture hooks on the layers exactly while active."""
        if self._active and not self._hooks:
            self._hooks = [layer.register_forward_pre_hook(self._make_hook(i)) for i, layer in enumerate(self._layers)]
        elif not self._active and self._hooks:
            for handle in self._hooks:
                handle.remove()
            self._hooks = []

    @contextmanager
    def recording(self, keep: torch.Tensor | None = None) -> Iterator[None]:
        """Fold the BN inputs of the forward pass run inside this block into the statistics, layer by
        layer as it runs; `keep` (B,) bool: only these rows (None: all)."""
        self._recording = self._active and self.enabled
        self._keep = keep
        self._folded = 0
        self._folding: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (mean, var) this forward
        try:
            yield
        finally:
            if self._recording and self._folded:
                self._samples += self._folded
                # one reference swap, from what the hooks computed (layers this forward did not reach
                # keep theirs): the layers hold them already
                self._stats = [self._folding.get(i, st) for i, st in enumerate(self._stats)]
                self._applied = self._stats
            self._recording = False
            self._keep = None

    def observe(self, obs: Observation | None = None) -> None:
        """Nothing to do: the moments are folded inside the served forward (see the module)."""

    def _adapted(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (mean, var) to normalise with: the live moments, shrunk to the source's noise."""
        return [self._adapted_layer(i) for i in range(len(self._layers))]

    def _adapted_layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (mean, var) from its EMAs, computed as the served forward computes them (a
        restored state normalises exactly as the one saved)."""
        as_array, as_tensor = _arithmetic(self._mean[i])
        src_mu, src_var = as_array(self._source[i][0]), as_array(self._source_var[i])
        mu, var = self._adapted_moments(as_array(self._mean[i]), as_array(self._sq[i]), as_array(self._noise[i]),
                                        src_mu, src_var, self._layers[i].eps)
        return as_tensor(mu), as_tensor(var)

    def _adapted_moments(self, mu, sq, noise, src_mu, src_var, eps: float):
        """(mean, var) to normalise with from one layer's EMAs (tensors or NumPy arrays, base.array_ops);
        `src_var`: the source's, floored at `eps` (`_source_var`)."""
        xp = array_ops(mu)
        var = xp.clamp_min(sq - mu ** 2, eps)
        zz, qq, zq = noise
        ez = mu - src_mu
        eq = var + ez ** 2
        spread = xp.clamp_min(zz - ez ** 2, 0.0)  # variance of one sample's mean
        # variance of one sample's contribution to var = E q - (E z)^2 (delta method), relative
        var_spread = xp.clamp_min((qq - eq ** 2) - 4 * ez * (zq - ez * eq) + 4 * ez ** 2 * spread, 0.0) / var ** 2
        return shrink_to_source(mu, var, src_mu, src_var, self.momentum, self.noise_se,
                                spread, var_spread)

    @torch.no_grad()
    def apply(self) -> None:
        """Serving thread: a pending reset, the hooks, and the statistics into the layers."""
        if self._reset_pending:
            self._reset_pending = False
            active = self._active  # as activate() after the reset left it
            self._reset()
            self._active = active
        self.sync_hooks()
        stats = self._stats  # the source's own tensors until something is folded in: restored exactly
        if stats is self._applied:
            return
        for layer, (mu, var) in zip(self._layers, stats):
            layer.running_mean.copy_(mu)
            layer.running_var.copy_(var)
        self._applied = stats

    def load_state_dict(self, state: dict) -> None:
        """As StateMixin, with the moments moved to their layers' device (snapshots load on the CPU).
        A state saved before the noise was tracked gets the most noise a map can have."""
        if "_noise" not in state and "_mean" in state:
            state = {**state, "_noise": [n.clone() for n in self._reset_noise()]}
        super().load_state_dict(state)
        self._mean = [m.to(layer.running_mean.device) for m, layer in zip(self._mean, self._layers)]
        self._sq = [q.to(layer.running_mean.device) for q, layer in zip(self._sq, self._layers)]
        self._noise = [q.to(layer.running_mean.device) for q, layer in zip(self._noise, self._layers)]
        self._stats = self._adapted()
        self._applied = None
        self._reset_pending = False

    def moments(self) -> dict:
        """The adapted statistics, for a learner that trains with what serving normalises with."""
        stats = self._stats
        return {"active": self._active, "mean": [m.cpu() for m, _ in stats], "sq": [(v + m ** 2).cpu() for m, v in stats]}

    def reset(self) -> None:
        """Restore the source statistics exactly and stop adapting, at the next `apply` (the serving
        thread's: it owns the moments)."""
        self._active = False
        self._reset_pending = True

    def finite(self) -> bool:
        """Whether the statistics served are all finite."""
        return all(bool(torch.isfinite(m).all() and torch.isfinite(v).all()) for m, v in self._stats)

    def status(self) -> dict:
        return {"layers": len(self._layers), "active": self._active, "samples": self._samples}


def _to_host(dtype: torch.dtype) -> Callable:
    return lambda t: (t if t.dtype == dtype else t.to(dtype)).numpy()


# per dtype, built once: the served forward asks for them in every layer
_HOST = {dtype: (_to_host(dtype), torch.from_numpy) for dtype in (torch.float32, torch.float64)}


def _arithmetic(like: torch.Tensor) -> tuple[Callable, Callable]:
    """(to arrays, back to tensors) for the per-channel arithmetic on `like`'s moments: NumPy views
    of the same memory for float tensors on the CPU, tensors on `like`'s device and dtype otherwise."""
    if like.device.type == "cpu" and like.dtype in _HOST:
        return _HOST[like.dtype]
    return (lambda t: t.to(like.device, like.dtype)), (lambda a: a)
