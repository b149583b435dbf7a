"""Bayesian updating of class priors under label shift, applied to the logits.

Under label shift p(x|y) stays and p(y) moves; the source model's posteriors
can be re-weighted to the new priors: p'(y|x) ~ p(y|x) pi(y) / pi_src(y)
(Saerens et al. 2002). pi is estimated online by EM on unlabelled predictions:
each batch contributes its mean re-weighted posterior, folded in with a
per-sample momentum, and a Dirichlet pseudo-count pulls pi back towards
pi_src, so the correction reverts when the shift ends. The estimate always
runs (cheap); the correction is applied only while `active`.
"""
from __future__ import annotations

import torch

from selfheal_core.correct.base import Corrector, Observation


class PriorCorrector(Corrector):
    """Online EM estimate of class priors; `adjust(logits)` applies them.

    >>> src = torch.full((3,), 1 / 3)
    >>> pc = PriorCorrector(src, momentum=0.05)
    >>> probs = torch.tensor([[0.8, 0.1, 0.1]]).repeat(200, 1)  # traffic now mostly class 0
    >>> for i in range(0, 200, 8):
    ...     pc.observe(Observation(raw=probs[i:i + 8].log(), probs=probs[i:i + 8]))
    >>> pc.activate()
    >>> [round(v, 2) for v in pc.prior.tolist()]
    [0.97, 0.02, 0.02]
    >>> pc.adjust(torch.zeros(1, 3)).softmax(1).argmax().item()
    0
    """

    name = "prior"
    _state_keys = ("_prior", "_active", "_samples")

    def __init__(self, source_prior: torch.Tensor, momentum: float = 0.01, pseudo_count: float = 0.002) -> None:
        if source_prior.dim() != 1 or (source_prior <= 0).any():
            raise ValueError("source_prior must be a 1-D tensor of positive class probabilities")
        if not 0 < momentum <= 1 or pseudo_count < 0:
            raise ValueError(f"need 0 < momentum <= 1 and pseudo_count >= 0, got {momentum}, {pseudo_count}")
        super().__init__()
        self.momentum = momentum  # per-sample weight of new evidence: memory of ~1/momentum samples
        self.pseudo_count = pseudo_count  # per-sample pull back towards the source prior
        self._source = (source_prior / source_prior.sum()).double().cpu()
        self._reset()

    def _reset(self) -> None:
        self._prior = self._source.clone()  # replaced (never changed in place) by each estimate
        self._shift: torch.Tensor | None = None  # log-prior shift of the current estimate, cached
        self._active = False
        self._samples = 0

    @property
    def prior(self) -> torch.Tensor:
        return self._prior.clone()

    def observe(self, obs: Observation) -> None:
        """One online EM step from the source model's probabilities (B, C)."""
        p = obs.probs.detach().double().cpu()
        prior = self._prior
        w = p * (prior / self._source)  # E-step: posteriors under the current prior
        w = w / w.sum(1, keepdim=True)
        keep = (1 - self.momentum) ** len(p)
        prior = keep * prior + (1 - keep) * w.mean(0)  # M-step, folded in with momentum
        pull = 1 - (1 - self.pseudo_count) ** len(p)
        prior = (1 - pull) * prior + pull * self._source
        self._shift = (prior.clamp_min(1e-6).log() - self._source.log()).float()
        self._prior = prior
        self._samples += len(p)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) re-weighted to the estimated priors (unchanged while inactive)."""
        shift = self._shift
        if not self._active or shift is None:
            return logits
        return logits + shift.to(logits.device, logits.dtype)

    def reset(self) -> None:
        self._reset()

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._shift = (self._prior.clamp_min(1e-6).log() - self._source.log()).float()

    def status(self) -> dict:
        top = torch.topk(self._prior, min(3, len(self._prior)))
        return {"active": self._active, "top_prior": {int(i): round(float(v), 3) for v, i in zip(*top)}}
