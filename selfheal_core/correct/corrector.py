"""When each label-free corrector runs, and collapse protection.

Input adaptation (BatchNorm statistics, LayerNorm/GroupNorm affine, the
feature adapter) starts when the model becomes unsure: a confidence alarm for
classifiers, a feature or output shift for regression. A feature shift alone
is not enough for classifiers: under pure label shift the features move with
the class mix while the model stays sure. A class-shift alarm switches on the
prior correction, but only while the confidence detector has been quiet for
`prior_quiet` predictions: under input shift the model's errors move its
predicted classes too, and re-weighting priors from those (measured: +4 to +5
points of error on continual corruptions) does harm. A collapse (predictions
piling onto one class far beyond the reference) resets input adaptation to
the source.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from selfheal_core.config import CorrectConfig
from selfheal_core.correct.affine import AffineNormAdapter
from selfheal_core.correct.base import Corrector, Observation
from selfheal_core.correct.entropy import EntropyAdapter
from selfheal_core.correct.input_stats import InputStatsAdapter
from selfheal_core.correct.norm_stats import NormStatsAdapter
from selfheal_core.correct.prior import PriorCorrector
from selfheal_core.model_parts import ModelParts
from selfheal_core.monitor import DetectorName
from selfheal_core.task import Task

log = logging.getLogger(__name__)

NOTHING_TO_ADAPT = "nothing to adapt; labelled feedback only"


class LabelFreeCorrector:
    """The label-free parts that apply to this model, their activation and collapse protection."""

    def __init__(self, model: nn.Module, parts: ModelParts, task: Task, reference_probs: torch.Tensor | None,
                 config: CorrectConfig = CorrectConfig(), trainee: nn.Module | None = None,
                 reference: torch.Tensor | None = None) -> None:
        self.config = c = config
        self.task = task
        self.inputs: list[Corrector] = []  # adapt what the model computes from its inputs
        float_ref = reference is not None and reference.is_floating_point() and len(reference) >= 2
        # no statistics inside the model to re-estimate: align its inputs' (bench_heal: LayerNorm MLP
        # 0.70 -> 0.44 continual error, where every entropy method stayed within 3 points of the source);
        # with BatchNorm only a mirrored input is undone there, which no statistic inside can see
        align = c.input_stats and not parts.batchnorms
        if float_ref and (align or c.input_polarity):
            # a polarity-only adapter follows the live skew at the BatchNorm statistics' momentum (0.02
            # and 0.03 measured worse on Digits-C: rotate and salt flipped back and forth)
            self.inputs.append(InputStatsAdapter(model, reference, c.input_momentum if align else c.momentum,
                                                 c.noise_se, align=align, polarity=c.input_polarity))
        if c.norm_stats and parts.batchnorms:
            self.inputs.append(NormStatsAdapter(parts.batchnorms, c.momentum, noise_se=c.noise_se))
        if c.norm_affine and parts.affine_norms and trainee is not None and task.is_classifier:
            self.inputs.append(AffineNormAdapter(model, trainee, [n for n, _ in parts.affine_norms], task,
                                                 c.affine_lr, c.entropy_step_every, c.entropy_margin,
                                                 c.entropy_anchor, c.entropy_decay))
        if c.entropy and parts.head is not None and task.is_classifier:
            self.inputs.append(EntropyAdapter(parts.head, c.entropy_lr, c.entropy_step_every, c.entropy_margin,
                                              c.entropy_anchor, c.entropy_decay))
        self.prior = (PriorCorrector(reference_probs.mean(0), c.prior_momentum)
                      if c.prior and reference_probs is not None else None)
        self.parts: list[Corrector] = self.inputs + ([self.prior] if self.prior else [])
        if reference_probs is not None:
            classes = reference_probs.argmax(1)
            self._ref_share = float(torch.bincount(classes, minlength=reference_probs.shape[1]).max()) / len(classes)
            self._width = reference_probs.shape[1]
        else:
            self._ref_share, self._width = 1.0, 0
        self._covariate = ((DetectorName.CONFIDENCE.value,) if task.is_classifier
                           else (DetectorName.FEATURE_SHIFT.value, DetectorName.OUTPUT_SHIFT.value))
        self._reset()

    def _reset(self) -> None:
        self._share = torch.zeros(self._width, dtype=torch.float64)  # EMA of predicted classes
        self.collapses = 0
        self.nonfinite_resets = 0
        self._since_unsure = self.config.prior_quiet  # predictions since the last confidence alarm
        self._since_class = self.config.prior_quiet  # since a class-shift alarm without a confidence alarm
        if self.config.when == "always":
            for part in self.inputs:
                part.activate()
            if self.prior:
                self.prior.activate()

    @property
    def needs_inputs(self) -> bool:
        return any(p.needs_inputs for p in self.inputs)

    @property
    def summary(self) -> str:
        """What label-free correction can do for this model, in words (load log and status)."""
        names = [p.name for p in self.parts]
        return ", ".join(names) if names else NOTHING_TO_ADAPT

    def _activate(self, fired: list[str]) -> list[str]:
        started = []
        shift = DetectorName.CLASS_SHIFT.value
        conf = DetectorName.CONFIDENCE.value
        # `fired` is in order of first alarm: classes moving before the model became unsure is
        # label shift, also when both alarms fall into one batch
        if shift in fired and (conf not in fired or fired.index(shift) < fired.index(conf)):
            self._since_class = 0
        # A class-shift alarm while the model stayed sure marks a label-shift episode: statistics
        # adapted to a new class mix tripled the error there (measured), so adaptation waits.
        covariate = any(n in self._covariate for n in fired) and self._since_class >= self.config.prior_quiet
        for part in self.inputs:
            if covariate and part.enabled and not part.active:
                part.activate()
                started.append(part.name)
        if conf in fired:
            self._since_unsure = 0
            if self.prior:
                self.prior.deactivate()
        quiet = self._since_unsure >= self.config.prior_quiet
        if shift in fired and quiet and self.prior and not self.prior.active:
            self.prior.activate()
            started.append(self.prior.name)
        return started

    def observe(self, obs: Observation) -> list[str]:
        """After predictions: activate on alarms, adapt, check for collapse. Returns what started."""
        started = self._activate(obs.fired)
        self._since_unsure += len(obs.raw)
        self._since_class += len(obs.raw)
        for part in self.parts:
            part.observe(obs)
        for part in self.inputs:
            if not part.finite():  # whatever caused it, non-finite statistics would answer NaN to everyone
                part.reset()
                part.activate()
                self.nonfinite_resets += 1
                log.warning("label-free %s went non-finite: reset to the source (%d so far)", part.name,
                            self.nonfinite_resets)
        if obs.probs is not None and self._width:
            logits = obs.probs.clamp_min(1e-12).log()
            self._check_collapse((self.prior.adjust(logits) if self.prior else logits).argmax(1))
        return started

    def _check_collapse(self, predicted: torch.Tensor) -> None:
        keep = (1 - 1 / self.config.collapse_window) ** len(predicted)
        counts = torch.bincount(predicted.cpu(), minlength=self._width).double() / len(predicted)
        self._share = keep * self._share + (1 - keep) * counts
        adapting = any(p.active for p in self.inputs)
        if adapting and float(self._share.max()) > max(self.config.collapse_share, 2 * self._ref_share):
            for part in self.inputs:
                part.reset()
            self._share = torch.zeros_like(self._share)
            self.collapses += 1
            log.warning("label-free adaptation collapsed onto one class: reset to the source (%d so far)",
                        self.collapses)

    def adjust(self, raw: torch.Tensor) -> torch.Tensor:
        """Output correction of the serving pass (class priors); raw outputs otherwise."""
        if self.prior is None or not self.prior.active:
            return raw
        return self.task.from_class_logits(self.prior.adjust(self.task.class_logits(raw)), raw)

    def rebase(self, weights: dict[str, torch.Tensor]) -> None:
        """Serving thread: a new version's weights were installed."""
        for part in self.inputs:
            part.rebase(weights)

    def apply(self) -> None:
        """Serving thread: copy adapted values into the model."""
        for part in self.inputs:
            part.apply()

    @property
    def active(self) -> bool:
        return any(p.active for p in self.parts)

    def norm_stats(self) -> NormStatsAdapter | None:
        return next((p for p in self.inputs if isinstance(p, NormStatsAdapter)), None)

    def input_stats(self) -> InputStatsAdapter | None:
        return next((p for p in self.inputs if isinstance(p, InputStatsAdapter)), None)

    def reset(self) -> None:
        for part in self.parts:
            part.reset()
        self._reset()

    def state_dict(self) -> dict:
        return {"parts": {p.name: p.state_dict() for p in self.parts}, "share": self._share.clone(),
                "collapses": self.collapses}

    def load_state_dict(self, state: dict) -> None:
        """A part missing from the state (saved before the part existed) starts from the source,
        active when the saved input adaptation was (it would have started with the others)."""
        if set(state) != {"parts", "share", "collapses"} or not set(state["parts"]) <= {p.name for p in self.parts}:
            raise ValueError(f"LabelFreeCorrector state does not match parts {[p.name for p in self.parts]}")
        missing = [p for p in self.parts if p.name not in state["parts"]]
        for part in self.parts:
            if part.name in state["parts"]:
                part.load_state_dict(state["parts"][part.name])
        adapting = self.config.when == "always" or any(p.active for p in self.inputs if p not in missing)
        for part in missing:
            part.reset()
            if adapting and part in self.inputs:
                part.activate()
        self._share, self.collapses = state["share"].clone(), int(state["collapses"])

    def status(self) -> dict:
        return {"available": self.summary, **{p.name: p.status() for p in self.parts},
                "collapse_resets": self.collapses, "nonfinite_resets": self.nonfinite_resets}
