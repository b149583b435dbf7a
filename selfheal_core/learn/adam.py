"""Adam for the learner's chosen parameters, without torch.optim.

torch.optim's optimizers import torch._dynamo on their first call (they are wrapped in
`torch._disable_dynamo`): 2.4 CPU-s in every process that learns from labels, more than the rest
of a learner's start. This is the update torch.optim.Adam makes on its single-tensor path
(no weight decay, amsgrad or maximize; each parameter counts its own steps), operation for
operation: tests/core/test_learn.py holds the two to the same bits.
"""
from __future__ import annotations

from typing import Iterable

import torch


class Adam:
    """`step()` after the gradients are in; `lr` may change between steps."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("Adam got no parameters")
        if not (lr >= 0 and eps >= 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Adam: lr {lr}, betas {betas}, eps {eps} out of range")
        self.lr, self.betas, self.eps = lr, betas, eps
        # per parameter, as torch keeps them: steps taken (a step without a gradient skips it) and
        # the two moments, made at its first step
        self._steps = [0] * len(self.params)
        self._moments: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if self._moments[i] is None:
                self._moments[i] = (torch.zeros_like(p, memory_format=torch.preserve_format),
                                    torch.zeros_like(p, memory_format=torch.preserve_format))
            exp_avg, exp_avg_sq = self._moments[i]
            grad = p.grad
            self._steps[i] += 1
            step = float(self._steps[i])  # torch's step count is a float
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** step
            bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-(self.lr / bias_correction1))
