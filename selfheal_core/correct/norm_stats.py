"""Normalisation-statistics adaptation that works at request batch size 1.

BatchNorm layers normalise with running statistics estimated on training data;
under covariate shift those are wrong (Schneider et al. 2020). Instead of batch
statistics (useless for one input), each BN layer's input moments are folded
into a per-sample exponential moving average across requests, starting from
the source statistics, and written into `running_mean` / `running_var`.
The BN inputs are kept by forward pre-hooks during the prediction pass itself
(a reference, no arithmetic: the request path stays cheap), and `observe()`
folds everything kept since the last call in one vectorised step, exactly as
one sample at a time would. Predict first, then adapt: a request never sees
statistics its own input helped estimate.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from selfheal_core.state import StateMixin


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that track running statistics, in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class NormStatsAdapter(StateMixin):
    """EMA of BatchNorm input moments from live traffic (a no-op for models without BN)."""

    _state_keys = ("_mean", "_sq", "_active", "_samples")

    def __init__(self, model: nn.Module, momentum: float = 0.01, max_pending: int = 4096) -> None:
        if not 0 < momentum <= 1 or max_pending < 1:
            raise ValueError(f"need momentum in (0, 1] and max_pending >= 1, got {momentum}, {max_pending}")
        self.momentum = momentum
        self.max_pending = max_pending  # forwards kept between observe() calls
        self._layers = batchnorm_layers(model)
        self._source = [(m.running_mean.clone(), m.running_var.clone()) for m in self._layers]
        self._captured: list[list[torch.Tensor]] = [[] for _ in self._layers]  # BN inputs not yet folded
        self._recording = False
        self._hooks: list = []  # registered only while adapting: an idle hook still costs every forward
        self._reset()

    def _reset(self) -> None:
        self._captured = [[] for _ in self._layers]
        self._mean = [mu.clone() for mu, _ in self._source]  # per layer (C,)
        self._sq = [var + mu**2 for mu, var in self._source]  # second moment per layer (C,)
        self._active = False
        self._samples = 0  # samples folded in since activation

    def _make_hook(self, i: int):
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if self._recording:
                cap = self._captured[i]
                cap.append(inputs[0].detach())  # (B, C, ...): folded by observe()
                if len(cap) > self.max_pending:  # nobody observes: bounded memory, oldest dropped
                    del cap[0]
        return hook

    @property
    def enabled(self) -> bool:
        """Whether the model has anything to adapt."""
        return bool(self._layers)

    @property
    def active(self) -> bool:
        return self._active

    def activate(self) -> None:
        self._active = True
        self._sync_hooks()

    def _sync_hooks(self) -> None:
        if self._active and not self._hooks:
            self._hooks = [layer.register_forward_pre_hook(self._make_hook(i)) for i, layer in enumerate(self._layers)]
        elif not self._active and self._hooks:
            for handle in self._hooks:
                handle.remove()
            self._hooks = []

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Capture BN input moments during the forward pass run inside this block."""
        self._recording = self._active and self.enabled
        try:
            yield
        finally:
            self._recording = False

    def observe(self) -> None:
        """Fold the moments captured by the last recorded forward into the running statistics."""
        if not self._active:
            for cap in self._captured:
                cap.clear()
            return
        for i, (layer, cap) in enumerate(zip(self._layers, self._captured)):
            if not cap:
                continue
            x = torch.cat(cap) if len(cap) > 1 else cap[0]  # (N, C, ...) in arrival order
            cap.clear()
            dims = [d for d in range(2, x.dim())]
            mean = x.mean(dims) if dims else x  # per-sample moments (N, C)
            sq = (x * x).mean(dims) if dims else x * x
            # Per-sample EMA over the N samples in one step: sample k (0 = oldest) weighs
            # m (1-m)^(N-1-k), the old estimate (1-m)^N.
            n, keep = len(x), 1.0 - self.momentum
            w = self.momentum * keep ** torch.arange(n - 1, -1, -1, dtype=x.dtype, device=x.device)
            self._mean[i].mul_(keep ** n).add_(w @ mean)
            self._sq[i].mul_(keep ** n).add_(w @ sq)
            layer.running_mean.copy_(self._mean[i])
            layer.running_var.copy_((self._sq[i] - self._mean[i] ** 2).clamp_min(layer.eps))
            if i == 0:
                self._samples += n

    def load_state_dict(self, state: dict) -> None:
        """As StateMixin, with the moments moved to their layers' device (snapshots load on the CPU)."""
        super().load_state_dict(state)
        self._mean = [m.to(layer.running_mean.device) for m, layer in zip(self._mean, self._layers)]
        self._sq = [q.to(layer.running_mean.device) for q, layer in zip(self._sq, self._layers)]
        self._sync_hooks()

    def reset(self) -> None:
        """Restore the source statistics exactly and stop adapting."""
        self._reset()
        self._sync_hooks()
        for layer, (mu, var) in zip(self._layers, self._source):
            layer.running_mean.copy_(mu)
            layer.running_var.copy_(var)

    def status(self) -> dict:
        return {"layers": len(self._layers), "active": self._active, "samples": self._samples}
