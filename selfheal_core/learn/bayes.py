"""Bayesian last layer: a Kalman-style Gaussian posterior over the output Linear layer.

The weights W (K x F+1, bias folded in) get the posterior N(W, Sigma (x) I_K):
one feature covariance Sigma shared by the outputs (a Kronecker factorisation,
as in K-FAC Laplace), so a labelled sample costs O(F^2 + K F), not O((KF)^2).
Per labelled sample (features phi, target y), with z = [phi, 1]:

    Sigma <- Sigma / forgetting                   drift noise: old evidence fades
    Sigma <- Sigma - Sigma z z' Sigma / (1/h + z' Sigma z)      Sherman-Morrison
    W     <- W - g (Sigma z)'                     online Newton / EKF mean step

with g the gradient of the loss in the outputs and h its curvature, by task:
softmax (g = p - e_y, h = 1 - |p|^2 floored so a confident sample still
counts), sigmoid for one binary logit (g = p - y, h = p (1 - p) floored), and
identity for regression (g = W z - y, h = 1 / noise variance: recursive least
squares). The step is large while the layer is uncertain and shrinks as
evidence accumulates; forgetting keeps it from freezing, so it tracks drift.
"""
from __future__ import annotations

import torch
from torch import nn

from selfheal_core.state import StateMixin
from selfheal_core.task import Task, TaskKind

_MIN_CURVATURE = 0.05


class BayesianLastLayer(StateMixin):
    """Closed-form per-sample posterior updates of `layer`'s weights and bias, in place."""

    _state_keys = ("_sigma", "updates")

    def __init__(self, layer: nn.Linear, task: Task, prior_var: float = 0.01, forgetting: float = 0.995,
                 noise_var: float = 1.0) -> None:
        if prior_var <= 0 or not 0 < forgetting <= 1 or noise_var <= 0:
            raise ValueError(f"need prior_var > 0, forgetting in (0, 1], noise_var > 0; got {prior_var}, "
                             f"{forgetting}, {noise_var}")
        self.layer, self.task = layer, task
        self.prior_var, self.forgetting, self.noise_var = prior_var, forgetting, noise_var
        self.reset()

    def reset(self) -> None:
        """Back to the prior covariance (the weights themselves are the learner's to reset)."""
        dim = self.layer.in_features + (self.layer.bias is not None)
        # Regression: the prior in units of the noise variance, so the step does not depend on the
        # units of the targets (recursive least squares with ridge prior_var).
        scale = self.noise_var if self.task.kind is TaskKind.REGRESSION else 1.0
        self._sigma = torch.eye(dim, dtype=torch.float64) * self.prior_var * scale
        self.updates = 0

    def _augment(self, features: torch.Tensor) -> torch.Tensor:
        feats = features.detach().flatten(1).to("cpu", torch.float64)
        if self.layer.bias is None:
            return feats
        return torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], 1)  # (B, F+1)

    def _weights(self) -> torch.Tensor:
        layer = self.layer
        w = layer.weight if layer.bias is None else torch.cat([layer.weight, layer.bias[:, None]], 1)
        return w.detach().to("cpu", torch.float64)  # (K, F+1)

    def _gradient(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(dLoss/dOutputs (K,), curvature h) at outputs `out` (K,) for target y."""
        kind = self.task.kind
        if kind is TaskKind.CLASSIFICATION:
            p = torch.softmax(out, 0)
            h = max(1.0 - float(p @ p), _MIN_CURVATURE)
            p[int(y)] -= 1.0
            return p, h
        if kind is TaskKind.BINARY:
            p = torch.sigmoid(out)
            return p - float(y), max(float(p * (1 - p)), _MIN_CURVATURE / 4)
        return out - y.double().reshape(-1), 1.0 / self.noise_var

    @torch.no_grad()
    def update(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """Fold labelled samples (features (B, F), targets (B, ...)) in, one at a time."""
        w = self._weights()
        for z, y in zip(self._augment(features), targets.detach().cpu()):
            g, h = self._gradient(w @ z, y)
            sigma = self._sigma / self.forgetting
            sz = sigma @ z
            sigma = sigma - torch.outer(sz, sz) / (1.0 / h + float(z @ sz))
            self._sigma = (sigma + sigma.T) / 2  # keep it symmetric against rounding
            w -= torch.outer(g, self._sigma @ z)
            self.updates += 1
        fin = self.layer.in_features
        self.layer.weight.copy_(w[:, :fin].to(self.layer.weight))
        if self.layer.bias is not None:
            self.layer.bias.copy_(w[:, fin].to(self.layer.bias))

    def status(self) -> dict:
        return {"updates": self.updates, "trace": round(float(self._sigma.diagonal().sum()), 6)}
