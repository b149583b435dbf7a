"""Online entropy minimisation of a feature adapter, from reliable samples, batch size 1 included.

TENT (Wang et al. 2021) minimises prediction entropy over the BatchNorm affine
parameters with batch statistics; it needs batches, back-propagates through
the whole network and collapses on long streams. Here the adapted set is a
per-feature scale and shift on the input of the last Linear layer (the same
for BatchNorm, LayerNorm or norm-free models): the loss needs only the
features already computed by the prediction pass, so an update costs a
fraction of a forward. Samples are buffered across requests until a step is
due; only confident samples count, weighted by exp(E0 - H) as in EATA (Niu et
al. 2022); an L2 anchor and a per-step decay pull the adapter back to the
identity, so it cannot drift far and returns when the shift ends.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from selfheal_core.state import StateMixin


class FeatureAdapter(nn.Module):
    """x * (1 + scale) + shift on the last Linear's input; identity at zero parameters."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(features))
        self.shift = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.scale) + self.shift


class EntropyAdapter(StateMixin):
    """Installs a FeatureAdapter as a forward pre-hook on `head` and trains it on buffered features."""

    _state_keys = ("_adapter_state", "_pending", "_steps", "_active")

    def __init__(self, head: nn.Linear, lr: float = 0.01, step_every: int = 64, margin: float = 0.4,
                 anchor: float = 1.0, decay: float = 0.01) -> None:
        if not (lr > 0 and step_every >= 1 and 0 < margin <= 1 and anchor >= 0 and 0 <= decay < 1):
            raise ValueError("need lr > 0, step_every >= 1, 0 < margin <= 1, anchor >= 0, 0 <= decay < 1")
        self.lr = lr  # SGD step size
        self.step_every = step_every  # samples between steps (accumulated across requests)
        self.margin = margin  # reliable: entropy below margin * log(C)
        self.anchor = anchor  # L2 pull towards the identity in the loss
        self.decay = decay  # fraction of the adapter removed before each step (return to source)
        self.head = head
        self.adapter = FeatureAdapter(head.in_features).to(head.weight.device)
        self._opt = torch.optim.SGD(self.adapter.parameters(), lr=lr, momentum=0.9)
        self._buffer: list[torch.Tensor] = []
        head.register_forward_pre_hook(lambda _m, args: (self.adapter(args[0]),) if self._active else None)
        self._reset()

    def _reset(self) -> None:
        with torch.no_grad():
            for p in self.adapter.parameters():
                p.zero_()
        self._opt = torch.optim.SGD(self.adapter.parameters(), lr=self.lr, momentum=0.9)
        self._buffer = []
        self._pending = 0
        self._steps = 0
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def activate(self) -> None:
        self._active = True

    def observe(self, features: torch.Tensor) -> None:
        """Buffer the prediction pass's raw head inputs (B, F); step when enough have arrived."""
        if not self._active:
            return
        self._buffer.append(features.detach())
        self._pending += len(features)
        if self._pending >= self.step_every:
            self._step(torch.cat(self._buffer)[-4 * self.step_every:])
            self._buffer, self._pending = [], 0

    @torch.enable_grad()
    def _step(self, feats: torch.Tensor) -> None:
        with torch.no_grad():
            for p in self.adapter.parameters():
                p.mul_(1 - self.decay)
        feats = feats.to(self.head.weight.device, self.head.weight.dtype)  # captured on the CPU
        logits = F.linear(self.adapter(feats), self.head.weight.detach(),
                          None if self.head.bias is None else self.head.bias.detach())
        logp = logits.log_softmax(1)
        ent = -(logp.exp() * logp).sum(1)  # (B,)
        e0 = self.margin * math.log(logits.shape[1])
        reliable = ent < e0
        loss = self.anchor * sum((p ** 2).sum() for p in self.adapter.parameters())
        if reliable.any():
            weight = torch.exp(e0 - ent[reliable]).detach()  # EATA: the more certain, the more weight
            loss = loss + (weight * ent[reliable]).mean()
        if not torch.isfinite(loss):  # diverged (e.g. too large a step size): back to the identity
            self._reset()
            self._active = True
            return
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        self._opt.step()
        self._steps += 1

    def reset(self) -> None:
        """Identity adapter, empty buffer, inactive."""
        self._reset()

    @property
    def _adapter_state(self) -> dict:
        return self.adapter.state_dict()

    @_adapter_state.setter
    def _adapter_state(self, value: dict) -> None:
        self.adapter.load_state_dict(value)

    @torch.no_grad()
    def status(self) -> dict:
        norm = float(sum((p ** 2).sum() for p in self.adapter.parameters()) ** 0.5)
        return {"active": self._active, "steps": self._steps, "adapter_norm": round(norm, 4)}
