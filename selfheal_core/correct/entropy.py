"""Entropy minimisation from reliable samples: the shared loss, and a feature adapter on the head input.

TENT (Wang et al. 2021) minimises prediction entropy over the BatchNorm affine
parameters with batch statistics; it needs batches, back-propagates through
the whole network and collapses on long streams. `reliable_entropy` is the
EATA form (Niu et al. 2022): only confident samples count (entropy below
`margin` log C), weighted by exp(E0 - H). `EntropyAdapter` trains a
per-feature scale and shift on the input of the last Linear layer (the same
for BatchNorm, LayerNorm or norm-free models): the loss needs only features
the prediction pass already computed, so a step costs a fraction of a
forward. Samples are buffered across requests until a step is due; an L2
anchor and a per-step decay pull the adapter back to the identity, so it
cannot drift far and returns when the shift ends.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from selfheal_core.correct.base import Corrector, Observation, SampleBuffer


def reliable_entropy(logits: torch.Tensor, margin: float) -> torch.Tensor:
    """EATA's loss: mean over reliable samples of exp(E0 - H) H, E0 = margin log C (0 if none)."""
    logp = logits.log_softmax(1)
    ent = -(logp.exp() * logp).sum(1)  # (B,)
    e0 = margin * math.log(logits.shape[1])
    reliable = ent < e0
    if not reliable.any():
        return logits.sum() * 0.0
    weight = torch.exp(e0 - ent[reliable]).detach()  # the more certain, the more weight
    return (weight * ent[reliable]).mean()


class FeatureAdapter(nn.Module):
    """x * (1 + scale) + shift on the last Linear's input; identity at zero parameters."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(features))
        self.shift = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.scale) + self.shift


class EntropyAdapter(Corrector):
    """A FeatureAdapter before `head` (a forward pre-hook), trained on buffered features.

    The served adapter's values are replaced only by `apply()`; training runs on a second
    adapter, so a forward never sees a half-done optimiser step.
    """

    name = "entropy"
    _state_keys = ("_adapter_state", "_steps", "_active")

    def __init__(self, head: nn.Linear, lr: float = 0.01, step_every: int = 64, margin: float = 0.4,
                 anchor: float = 1.0, decay: float = 0.01) -> None:
        if not (lr > 0 and step_every >= 1 and 0 < margin <= 1 and anchor >= 0 and 0 <= decay < 1):
            raise ValueError("need lr > 0, step_every >= 1, 0 < margin <= 1, anchor >= 0, 0 <= decay < 1")
        super().__init__()
        self.lr = lr  # SGD step size
        self.step_every = step_every  # samples between steps (accumulated across requests)
        self.margin = margin  # reliable: entropy below margin * log(C)
        self.anchor = anchor  # L2 pull towards the identity in the loss
        self.decay = decay  # fraction of the adapter removed before each step (return to source)
        self.head = head
        self.served = FeatureAdapter(head.in_features).to(head.weight.device).requires_grad_(False)
        self.trainee = FeatureAdapter(head.in_features)  # trained on the CPU, where features are kept
        self._hook = head.register_forward_pre_hook(
            lambda _m, args: (self.served(args[0]),) if self._active else None)
        self._reset()

    def _reset(self) -> None:
        with torch.no_grad():
            for p in self.trainee.parameters():
                p.zero_()
        self._opt = torch.optim.SGD(self.trainee.parameters(), lr=self.lr, momentum=0.9)
        self._buffer = SampleBuffer(self.step_every, 4 * self.step_every)
        self._steps = 0
        self._active = False
        self._published = {k: v.detach().clone() for k, v in self.trainee.state_dict().items()}

    def observe(self, obs: Observation) -> None:
        """Buffer the prediction pass's raw head inputs (B, F); step when enough have arrived."""
        if self._active and obs.features is not None:
            batch = self._buffer.add(obs.features.float())
            if batch is not None:
                self._step(batch)

    @torch.enable_grad()
    def _step(self, feats: torch.Tensor) -> None:
        with torch.no_grad():
            for p in self.trainee.parameters():
                p.mul_(1 - self.decay)
        w, b = self.head.weight.detach().cpu().float(), self.head.bias
        logits = F.linear(self.trainee(feats), w, None if b is None else b.detach().cpu().float())
        loss = reliable_entropy(logits, self.margin) + self.anchor * sum(
            (p ** 2).sum() for p in self.trainee.parameters())
        if not torch.isfinite(loss):  # diverged (e.g. too large a step size): back to the identity
            self._reset()
            self._active = True
            return
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        self._opt.step()
        self._steps += 1
        self._published = {k: v.detach().clone() for k, v in self.trainee.state_dict().items()}

    @torch.no_grad()
    def apply(self) -> None:
        published = self._published
        for name, p in self.served.named_parameters():
            p.copy_(published[name])

    def reset(self) -> None:
        """Identity adapter, empty buffer, inactive (takes effect at `apply`)."""
        self._reset()

    def remove(self) -> None:
        self._hook.remove()

    @property
    def _adapter_state(self) -> dict:
        return self.trainee.state_dict()

    @_adapter_state.setter
    def _adapter_state(self, value: dict) -> None:
        self.trainee.load_state_dict(value)
        self._published = {k: v.detach().clone() for k, v in self.trainee.state_dict().items()}

    @torch.no_grad()
    def status(self) -> dict:
        norm = float(sum((p ** 2).sum() for p in self.trainee.parameters()) ** 0.5)
        return {"active": self._active, "steps": self._steps, "adapter_norm": round(norm, 4)}
