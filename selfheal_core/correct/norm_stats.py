"""Normalisation-statistics adaptation that works at request batch size 1.

BatchNorm layers normalise with running statistics estimated on training data;
under covariate shift those are wrong (Schneider et al. 2020). Instead of batch
statistics (useless for one input), each BN layer's input moments are folded
into a per-sample exponential moving average across requests, starting from
the source statistics, and written into `running_mean` / `running_var`.
The BN inputs are kept by forward pre-hooks during the prediction pass itself,
and `observe()` folds everything kept since the last call in one vectorised
step, exactly as one sample at a time would.

In that pass each layer normalises with the adapted moments folded, at the
same per-sample weights, with its own input's moments (RoTTA's robust
BatchNorm does the same): the batch's own share is 1 - (1 - momentum)^B, 1% at
batch 1 and 47% at batch 64. Then every layer's input is what the layers
before it make of this batch with statistics that include it, and the moments
kept for `observe()` agree across layers. Normalised with moments from earlier
forwards alone, as before, each layer's kept input came through layers whose
statistics were about to change: on a ResNet-20 (19 BatchNorm layers) the
estimates chased each other and served error swung between 0.1 and 0.97
within one Fashion-MNIST-C domain (zoom blur: 0.20 source, 0.53 adapted;
now 0.13); the 2-layer digits CNN never showed it.
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from selfheal_core.correct.base import Corrector, Observation, ema_weights, shrink_to_source


class NormStatsAdapter(Corrector):
    """EMA of BatchNorm input moments from live traffic (a no-op for models without BN)."""

    name = "norm_stats"
    _state_keys = ("_mean", "_sq", "_noise", "_active", "_samples")

    def __init__(self, layers: tuple[nn.Module, ...] | list[nn.Module], momentum: float = 0.01,
                 max_pending: int = 4096, noise_se: float = 2.0) -> None:
        if not 0 < momentum <= 1 or max_pending < 1:
            raise ValueError(f"need momentum in (0, 1] and max_pending >= 1, got {momentum}, {max_pending}")
        super().__init__()
        self.momentum = momentum
        self.noise_se = noise_se  # live moments this close to the source's are taken as noise
        self.max_pending = max_pending  # forwards kept between observe() calls
        self._layers = list(layers)
        self._source = [(m.running_mean.clone(), m.running_var.clone()) for m in self._layers]
        self._recording = False
        self._keep: torch.Tensor | None = None  # rows of the forward being recorded to capture
        self._hooks: list = []  # registered only while adapting: an idle hook still costs every forward
        self._reset()

    def _reset(self) -> None:
        # per-sample moments (mean, mean square) of BN inputs not yet folded: appended by the serving
        # thread, taken by observe()
        self._captured: list[deque] = [deque(maxlen=self.max_pending) for _ in self._layers]
        self._mean = [mu.clone() for mu, _ in self._source]  # per layer (C,); replaced, never changed in place
        self._sq = [var + mu ** 2 for mu, var in self._source]  # second moment per layer (C,)
        # their noise, per layer (3, C): EMAs of z^2, q^2 and z q, where z and q are one sample's mean
        # and mean square about the source mean; started where one Gaussian value per sample would
        # put them (the most noise a feature map can have)
        self._noise = self._reset_noise()
        self._stats = self._source  # per layer (mean, var) that apply() writes: the source until adapted
        self._base = self._stats  # what the forward being recorded blends with its own batch (serving thread)
        self._active = False
        self._samples = 0  # samples folded in since activation
        self._applied: object = None  # the moments last written into the layers

    def _reset_noise(self) -> list[torch.Tensor]:
        return [torch.stack([var, 3 * var ** 2, torch.zeros_like(var)]) for _, var in self._source]

    def _make_hook(self, i: int):
        def hook(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if self._recording:
                x = inputs[0].detach()  # (B, C, ...): folded by observe()
                keep = self._keep
                if keep is not None:
                    if not bool(keep.any()):
                        return
                    x = x[keep]  # rows outside the plausible range never reach the statistics
                dims = list(range(2, x.dim()))
                mean = x.mean(dims) if dims else x  # per-sample moments (N, C): kept for observe(), not
                sq = (x * x).mean(dims) if dims else x * x  # the activations (megabytes a layer at 224x224)
                self._captured[i].append((mean, sq))
                self._blend(i, layer, mean, sq)
        return hook

    def _blend(self, i: int, layer: nn.Module, mean: torch.Tensor, sq: torch.Tensor) -> None:
        """Serving thread, inside the forward: layer i normalises this batch with the adapted moments
        folded with the batch's own (the running statistics are restored by the next `apply`)."""
        mu, var = self._base[i]
        if mu.device != mean.device or mu.dtype != mean.dtype:
            mu, var = mu.to(mean.device, mean.dtype), var.to(mean.device, mean.dtype)
        if len(mean) == 1:  # batch 1, the common serving case: no weight vector to build
            old = 1.0 - self.momentum
            m = mu * old + self.momentum * mean[0]
            s = (var + mu * mu) * old + self.momentum * sq[0]
        else:
            w, old = ema_weights(len(mean), self.momentum, mean)
            m = mu * old + w @ mean
            s = (var + mu * mu) * old + w @ sq
        layer.running_mean.copy_(m)
        layer.running_var.copy_((s - m * m).clamp_min(layer.eps))

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
        """Capture BN inputs during the forward pass run inside this block; `keep` (B,) bool: only
        these rows (None: all)."""
        self._recording = self._active and self.enabled
        self._keep = keep
        self._base = self._stats  # the adapted moments this forward folds its own batch into
        try:
            yield
        finally:
            self._recording = False
            self._keep = None
            self._applied = None  # the layers hold this batch's blend: the next apply() writes the moments

    @torch.no_grad()
    def observe(self, obs: Observation | None = None) -> None:
        """Fold the BN input moments captured since the last call into the moving moments."""
        if not self._active:
            for cap in self._captured:
                cap.clear()
            return
        means, sqs, folded = list(self._mean), list(self._sq), 0
        noises = list(self._noise)
        for i, cap in enumerate(self._captured):
            parts = [cap.popleft() for _ in range(len(cap))]  # oldest first; later appends wait for the next call
            if not parts:
                continue
            # per-sample moments (N, C) in arrival order
            mean = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
            sq = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
            n = len(mean)
            w, old = ema_weights(n, self.momentum, mean)
            means[i] = means[i].to(mean.device) * old + w @ mean
            sqs[i] = sqs[i].to(mean.device) * old + w @ sq
            src = self._source[i][0].to(mean.device, mean.dtype)
            z = mean - src  # about a fixed centre, so folding many forwards at once stays exact
            q = sq - 2 * src * mean + src * src
            noises[i] = noises[i].to(mean.device) * old + torch.stack([w @ (z * z), w @ (q * q), w @ (z * q)])
            folded = max(folded, n)
        self._mean, self._sq, self._noise = means, sqs, noises
        self._samples += folded
        self._stats = self._adapted()  # one reference swap: apply() sees old or new, never half

    def _adapted(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (mean, var) to normalise with: the live moments, shrunk to the source's noise."""
        out = []
        for i, layer in enumerate(self._layers):
            mu, src_mu, src_var = self._mean[i], *(t.to(self._mean[i].device) for t in self._source[i])
            var = (self._sq[i] - mu ** 2).clamp_min(layer.eps)
            zz, qq, zq = self._noise[i]
            ez = mu - src_mu
            eq = var + ez ** 2
            spread = (zz - ez ** 2).clamp_min(0.0)  # variance of one sample's mean
            # variance of one sample's contribution to var = E q - (E z)^2 (delta method), relative
            var_spread = ((qq - eq ** 2) - 4 * ez * (zq - ez * eq) + 4 * ez ** 2 * spread).clamp_min(0.0) / var ** 2
            out.append(shrink_to_source(mu, var, src_mu, src_var.clamp_min(layer.eps), self.momentum, self.noise_se,
                                        spread, var_spread))
        return out

    @torch.no_grad()
    def apply(self) -> None:
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

    def moments(self) -> dict:
        """The adapted statistics, for a learner that trains with what serving normalises with."""
        stats = self._stats
        return {"active": self._active, "mean": [m.cpu() for m, _ in stats], "sq": [(v + m ** 2).cpu() for m, v in stats]}

    def reset(self) -> None:
        """Restore the source statistics exactly and stop adapting (takes effect at `apply`)."""
        self._reset()

    def finite(self) -> bool:
        """Whether the statistics served are all finite."""
        return all(bool(torch.isfinite(m).all() and torch.isfinite(v).all()) for m, v in self._stats)

    def status(self) -> dict:
        return {"layers": len(self._layers), "active": self._active, "samples": self._samples}
