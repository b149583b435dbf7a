"""Label-free correction: normalisation statistics, an entropy-trained feature adapter, class priors.

`LabelFreeCorrector` owns the three and decides when each runs: confidence
alarms (the model became unsure) switch on the statistics and the adapter;
a class-shift alarm switches on the prior correction, but only while the
confidence detector has been quiet for `prior_quiet` predictions: under input
shift the model's errors move its predicted classes too, and re-weighting
priors from those (measured: +4 to +5 points of error on continual
corruptions) does harm; pure label shift moves the features (the class mix
changes) but leaves the model confident. A collapse (predictions piling onto one class far
beyond the reference) resets the statistics and the adapter to the source.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from selfheal_core.config import CorrectConfig
from selfheal_core.correct.entropy import EntropyAdapter, FeatureAdapter
from selfheal_core.correct.norm_stats import NormStatsAdapter
from selfheal_core.correct.prior import PriorCorrector

__all__ = ["LabelFreeCorrector", "NormStatsAdapter", "EntropyAdapter", "FeatureAdapter", "PriorCorrector"]

# Adaptation starts when the model becomes unsure. A feature shift alone is not enough: under
# pure label shift the features move with the class mix while the model stays sure.
COVARIATE = ("confidence",)


class LabelFreeCorrector:
    """The label-free parts, their activation and collapse protection."""

    def __init__(self, model: nn.Module, head: nn.Linear, reference_probs: torch.Tensor,
                 config: CorrectConfig = CorrectConfig()) -> None:
        self.config = c = config
        self.norm = NormStatsAdapter(model, c.momentum)
        self.entropy = EntropyAdapter(head, c.entropy_lr, c.entropy_step_every, c.entropy_margin,
                                      c.entropy_anchor, c.entropy_decay)
        self.prior = PriorCorrector(reference_probs.mean(0), c.prior_momentum)
        classes = reference_probs.argmax(1)
        self._ref_share = float(torch.bincount(classes, minlength=reference_probs.shape[1]).max()) / len(classes)
        self._share = torch.zeros(reference_probs.shape[1], dtype=torch.float64)  # EMA of predicted classes
        self.collapses = 0
        self._since_unsure = c.prior_quiet  # predictions since the last confidence alarm
        self._since_class = c.prior_quiet  # predictions since a class-shift alarm without a confidence alarm
        if c.when == "always":
            self._activate(list(COVARIATE) + ["class_shift"])

    @contextmanager
    def recording(self) -> Iterator[None]:
        with self.norm.recording():
            yield

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """Class-prior correction of the prediction pass's logits."""
        return self.prior.adjust(logits) if self.config.prior else logits

    def _activate(self, fired: list[str]) -> list[str]:
        started = []
        # `fired` is in order of first alarm: classes moving before the model became unsure is
        # label shift, also when both alarms fall into one batch
        if "class_shift" in fired and ("confidence" not in fired
                                       or fired.index("class_shift") < fired.index("confidence")):
            self._since_class = 0
        # A class-shift alarm while the model stayed sure marks a label-shift episode: statistics
        # adapted to a new class mix tripled the error there (measured), so adaptation waits.
        covariate = any(n in COVARIATE for n in fired) and self._since_class >= self.config.prior_quiet
        if covariate and self.config.norm_stats and self.norm.enabled and not self.norm.active:
            self.norm.activate()
            started.append("norm_stats")
        if covariate and self.config.entropy and not self.entropy.active:
            self.entropy.activate()
            started.append("entropy")
        if "confidence" in fired:
            self._since_unsure = 0
            self.prior.deactivate()
        quiet = self._since_unsure >= self.config.prior_quiet
        if "class_shift" in fired and quiet and self.config.prior and not self.prior.active:
            self.prior.activate()
            started.append("prior")
        return started

    def observe(self, probs: torch.Tensor, features: torch.Tensor | None, fired: list[str]) -> list[str]:
        """After a prediction: activate on alarms, adapt, check for collapse. Returns what started."""
        started = self._activate(fired)
        self._since_unsure += len(probs)
        self._since_class += len(probs)
        self.norm.observe()
        if features is not None:
            self.entropy.observe(features)
        self.prior.observe(probs)
        self._check_collapse(self.adjust(probs.log()).argmax(1))
        return started

    def _check_collapse(self, predicted: torch.Tensor) -> None:
        keep = (1 - 1 / self.config.collapse_window) ** len(predicted)
        counts = torch.bincount(predicted.cpu(), minlength=len(self._share)).double() / len(predicted)
        self._share = keep * self._share + (1 - keep) * counts
        adapting = self.norm.active or self.entropy.active
        if adapting and float(self._share.max()) > max(self.config.collapse_share, 2 * self._ref_share):
            self.norm.reset()
            self.entropy.reset()
            self._share.zero_()
            self.collapses += 1

    @property
    def active(self) -> bool:
        return self.norm.active or self.entropy.active or self.prior.active

    def reset(self) -> None:
        self.norm.reset()
        self.entropy.reset()
        self.prior.reset()
        self._share.zero_()

    def state_dict(self) -> dict:
        return {"norm": self.norm.state_dict(), "entropy": self.entropy.state_dict(),
                "prior": self.prior.state_dict(), "share": self._share.clone(), "collapses": self.collapses}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"norm", "entropy", "prior", "share", "collapses"}:
            raise ValueError(f"LabelFreeCorrector state keys {sorted(state)}")
        self.norm.load_state_dict(state["norm"])
        self.entropy.load_state_dict(state["entropy"])
        self.prior.load_state_dict(state["prior"])
        self._share, self.collapses = state["share"].clone(), int(state["collapses"])

    def status(self) -> dict:
        return {"norm_stats": self.norm.status(), "entropy": self.entropy.status(), "prior": self.prior.status(),
                "collapse_resets": self.collapses}
