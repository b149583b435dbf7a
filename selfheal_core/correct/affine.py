"""Label-free adaptation of LayerNorm / GroupNorm affine parameters, for models without BatchNorm.

Models normalised per sample (LayerNorm, GroupNorm) have no statistics to
re-estimate; SAR (Niu et al. 2023) and ROID (Marsden et al. 2024) adapt their
affine parameters instead. Here they are trained on a copy of the model (the
trainee) by entropy minimisation over reliable samples (EATA's weighting),
from inputs buffered across requests (batch size 1 works), with an L2 anchor
and a per-step decay towards the source values; the corrector's collapse
check resets it. After each step the new values are published and copied
into the served model by `apply()`, on the serving thread.
"""
from __future__ import annotations

import torch
from torch import nn

from selfheal_core.correct.base import Corrector, Observation, SampleBuffer
from selfheal_core.correct.entropy import reliable_entropy
from selfheal_core.task import Task


class AffineNormAdapter(Corrector):
    """Entropy-trained affine parameters of the LayerNorm/GroupNorm layers of `served`."""

    name = "norm_affine"
    needs_inputs = True
    _state_keys = ("_values", "_steps", "_active")

    def __init__(self, served: nn.Module, trainee: nn.Module, norm_names: list[str], task: Task,
                 lr: float = 1e-3, step_every: int = 64, margin: float = 0.4, anchor: float = 1.0,
                 decay: float = 0.01) -> None:
        if not (lr > 0 and step_every >= 1 and 0 < margin <= 1 and anchor >= 0 and 0 <= decay < 1):
            raise ValueError("need lr > 0, step_every >= 1, 0 < margin <= 1, anchor >= 0, 0 <= decay < 1")
        super().__init__()
        self.lr, self.step_every, self.margin, self.anchor, self.decay = lr, step_every, margin, anchor, decay
        self.task = task
        served_modules, trainee_modules = dict(served.named_modules()), dict(trainee.named_modules())
        self._served = {f"{n}.{p}": getattr(served_modules[n], p) for n in norm_names for p in ("weight", "bias")
                        if getattr(served_modules[n], p, None) is not None}
        self._params = {k: getattr(trainee_modules[k.rsplit(".", 1)[0]], k.rsplit(".", 1)[1]) for k in self._served}
        self.trainee = trainee.eval()
        for p in trainee.parameters():
            p.requires_grad_(False)
        for p in self._params.values():
            p.requires_grad_(True)
        self._source = {k: p.detach().clone() for k, p in self._params.items()}
        self._reset()

    @property
    def enabled(self) -> bool:
        return bool(self._params) and self.task.is_classifier

    def _reset(self) -> None:
        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(self._source[k])
        self._opt = torch.optim.Adam(self._params.values(), lr=self.lr)
        self._buffer = SampleBuffer(self.step_every, 2 * self.step_every)
        self._steps = 0
        self._active = False
        self._values = {k: v.clone() for k, v in self._source.items()}  # published; replaced, not mutated

    def observe(self, obs: Observation) -> None:
        if self._active and obs.inputs is not None:
            batch = self._buffer.add(obs.inputs)
            if batch is not None:
                self._step(batch)

    @torch.enable_grad()
    def _step(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            for k, p in self._params.items():
                p.mul_(1 - self.decay).add_(self._source[k], alpha=self.decay)
        logits = self.task.class_logits(self.trainee(x))
        loss = reliable_entropy(logits, self.margin) + self.anchor * sum(
            ((p - self._source[k]) ** 2).sum() for k, p in self._params.items())
        if not torch.isfinite(loss):
            self._reset()
            self._active = True
            return
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        self._opt.step()
        self._steps += 1
        self._values = {k: p.detach().clone() for k, p in self._params.items()}

    @torch.no_grad()
    def apply(self) -> None:
        values = self._values
        for k, p in self._served.items():
            p.copy_(values[k])

    def reset(self) -> None:
        self._reset()

    @torch.no_grad()
    def rebase(self, weights: dict[str, torch.Tensor]) -> None:
        """Learned weights arrived: the trainee takes them all, and the new affine values become
        the source the adaptation starts from and is anchored to (active state kept)."""
        active = self._active
        for name, p in self.trainee.named_parameters():
            if name in weights:
                p.copy_(weights[name])
        self._source = {k: weights[k].detach().clone().to(p.device) if k in weights else v
                        for (k, v), p in zip(self._source.items(), self._params.values())}
        self._reset()
        self._active = active

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(self._values[k])

    @torch.no_grad()
    def status(self) -> dict:
        moved = sum(float(((self._values[k] - self._source[k]) ** 2).sum()) for k in self._source) ** 0.5
        return {"active": self._active, "layers": len(self._params) // 2, "steps": self._steps,
                "distance_from_source": round(moved, 5)}
