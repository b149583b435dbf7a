"""What the model predicts: classes (softmax logits), a binary logit, or real values.

Everything that depends on the task goes through a `Task`: how raw outputs
become probabilities, which targets are valid feedback, the loss a labelled
update minimises, the per-sample error the guard and the error detector
watch, and what a served prediction is. Binary models (one logit) are
treated as two-class classifiers with logits [0, z], so monitoring, prior
correction and the guard work on them unchanged; learning uses the
equivalent binary cross-entropy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F


class TaskKind(str, Enum):
    CLASSIFICATION = "classification"
    BINARY = "binary"
    REGRESSION = "regression"


@dataclass(frozen=True)
class Task:
    """A task and the width of the model's output: C classes, 1 logit, or D values."""

    kind: TaskKind
    outputs: int

    @classmethod
    def from_outputs(cls, kind: str | TaskKind, outputs: torch.Tensor) -> "Task":
        """Check sample outputs (B, ...) against the task; ValueError naming the setting to change."""
        try:
            kind = TaskKind(kind)
        except ValueError:
            raise ValueError(f"task must be one of {[k.value for k in TaskKind]}, got {kind!r}") from None
        if not isinstance(outputs, torch.Tensor) or not outputs.is_floating_point():
            raise ValueError(f"the model must return a float tensor, got {type(outputs).__name__}"
                             + (f" of {outputs.dtype}" if isinstance(outputs, torch.Tensor) else ""))
        shape = tuple(outputs.shape[1:])
        width = int(math.prod(shape)) if shape else 1
        if kind is TaskKind.CLASSIFICATION and (len(shape) != 1 or shape[0] < 2):
            hint = "task: binary" if width == 1 else "task: regression"
            raise ValueError(f"task classification needs outputs (B, C) with C >= 2 classes, the model returns "
                             f"(B, {', '.join(map(str, shape))}); for this model set `{hint}` in the handler "
                             "settings")
        if kind is TaskKind.BINARY and width != 1:
            raise ValueError(f"task binary needs one logit per input, (B,) or (B, 1); the model returns "
                             f"(B, {', '.join(map(str, shape))}); set `task: classification` for C logits")
        if kind is TaskKind.REGRESSION and len(shape) > 1:
            raise ValueError(f"task regression needs outputs (B,) or (B, D), the model returns (B, {shape})")
        return cls(kind, width)

    # ------------------------------------------------------------------ shape of the problem
    @property
    def is_classifier(self) -> bool:
        return self.kind is not TaskKind.REGRESSION

    @property
    def num_classes(self) -> int:
        """Classes seen by monitoring and priors (2 for binary); 0 for regression."""
        return 2 if self.kind is TaskKind.BINARY else self.outputs if self.is_classifier else 0

    # ------------------------------------------------------------------ outputs
    def class_logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of a classifier's raw outputs; a binary logit z becomes [0, z]."""
        if self.kind is TaskKind.BINARY:
            z = raw.reshape(len(raw), 1)
            return torch.cat([torch.zeros_like(z), z], 1)
        return raw

    def from_class_logits(self, logits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of `class_logits`, shaped like the raw outputs `like`."""
        if self.kind is TaskKind.BINARY:
            return (logits[:, 1] - logits[:, 0]).reshape(like.shape)
        return logits

    def probs(self, raw: torch.Tensor) -> torch.Tensor | None:
        """Class probabilities (B, C) for classifiers; None for regression."""
        return F.softmax(self.class_logits(raw).float(), 1) if self.is_classifier else None

    def values(self, raw: torch.Tensor) -> torch.Tensor:
        """Regression outputs as (B, D) float."""
        return raw.reshape(len(raw), -1).float()

    def served(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What was served: (labels (B,), confidence (B,)) for classifiers, (values (B, D), None) else."""
        if self.is_classifier:
            conf, labels = self.probs(raw).max(1)
            return labels, conf
        return self.values(raw), None

    # ------------------------------------------------------------------ targets
    def check_targets(self, y: Any, n: int) -> torch.Tensor:
        """Validated targets for n inputs: labels (n,) long, or values (n, D) float; ValueError otherwise."""
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"targets must be a tensor, got {type(y).__name__}")
        if len(y) != n:
            raise ValueError(f"got {len(y)} targets for {n} inputs")
        if self.is_classifier:
            if y.dim() != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ValueError("labels must be a 1-D integer tensor (a classifier takes class labels; "
                                 "real-valued targets need `task: regression`)")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"labels out of range: must be in [0, {self.num_classes - 1}]")
            return y.cpu().long()
        if not y.is_floating_point():
            raise ValueError("regression targets must be real numbers (a float tensor); class labels need a "
                             "classification task")
        y = y.reshape(n, -1) if y.dim() <= 2 else y
        if y.dim() != 2 or y.shape[1] != self.outputs:
            raise ValueError(f"regression targets must have {self.outputs} value(s) each, got shape {tuple(y.shape)}")
        if len(y) and not torch.isfinite(y).all():
            raise ValueError("targets contain NaN or inf")
        return y.cpu().float()

    # ------------------------------------------------------------------ learning
    def loss(self, raw: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The loss a labelled update minimises (and the guard judges)."""
        if self.kind is TaskKind.CLASSIFICATION:
            return F.cross_entropy(raw, y, reduction=reduction)
        if self.kind is TaskKind.BINARY:
            return F.binary_cross_entropy_with_logits(raw.reshape(len(raw)), y.float(), reduction=reduction)
        per = F.mse_loss(self.values(raw), y.reshape(len(y), -1).to(raw.dtype), reduction="none").mean(1)
        return per.mean() if reduction == "mean" else per

    def errors(self, raw_or_served: torch.Tensor, y: torch.Tensor, served: bool = False) -> torch.Tensor:
        """Per-sample error (B,): 0/1 mistakes for classifiers, squared error for regression."""
        if self.is_classifier:
            labels = raw_or_served if served else self.served(raw_or_served)[0]
            return (labels.cpu() != y.cpu()).double()
        pred = raw_or_served.reshape(len(y), -1) if served else self.values(raw_or_served)
        return ((pred.cpu().double() - y.cpu().double().reshape(len(y), -1)) ** 2).mean(1)
