"""Bayesian last layer: a Kalman-style Gaussian posterior over the output Linear layer.

The weights W (C x F+1, bias folded in) get the posterior N(W, Sigma (x) I_C):
one feature covariance Sigma shared by the classes (a Kronecker factorisation,
as in K-FAC Laplace), so a labelled sample costs O(F^2 + C F), not O((CF)^2).
Per labelled sample (features phi, label y), with z = [phi, 1]:

    Sigma <- Sigma / forgetting                   drift noise: old evidence fades
    Sigma <- Sigma - Sigma z z' Sigma / (1/h + z' Sigma z)      Sherman-Morrison
    W     <- W - (p - e_y) (Sigma z)'             online Newton / EKF mean step

p = softmax(W z) and h is the softmax curvature (1 - |p|^2, the trace of
diag(p) - p p', floored so a confident sample still counts). The step is large
while the layer is uncertain and shrinks as evidence accumulates; forgetting
keeps it from freezing, so it tracks drift. z' Sigma z is the predictive
variance of a logit: the uncertainty reported in `status()`.
"""
from __future__ import annotations

import torch
from torch import nn

from selfheal_core.state import StateMixin

_MIN_CURVATURE = 0.05


class BayesianLastLayer(StateMixin):
    """Closed-form per-sample posterior updates of `layer`'s weights and bias, in place."""

    _state_keys = ("_sigma", "updates")

    def __init__(self, layer: nn.Linear, prior_var: float = 0.01, forgetting: float = 0.995) -> None:
        if prior_var <= 0 or not 0 < forgetting <= 1:
            raise ValueError(f"need prior_var > 0 and forgetting in (0, 1], got {prior_var}, {forgetting}")
        self.layer, self.prior_var, self.forgetting = layer, prior_var, forgetting
        self.reset()

    def reset(self) -> None:
        """Back to the prior covariance (the weights themselves are the healer's to reset)."""
        dim = self.layer.in_features + (self.layer.bias is not None)
        self._sigma = torch.eye(dim, dtype=torch.float64) * self.prior_var
        self.updates = 0

    def _augment(self, features: torch.Tensor) -> torch.Tensor:
        feats = features.detach().flatten(1).to("cpu", torch.float64)
        if self.layer.bias is None:
            return feats
        return torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], 1)  # (B, F+1)

    def _weights(self) -> torch.Tensor:
        layer = self.layer
        w = layer.weight if layer.bias is None else torch.cat([layer.weight, layer.bias[:, None]], 1)
        return w.detach().to("cpu", torch.float64)  # (C, F+1)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold labelled samples (features (B, F), labels (B,)) in, one at a time."""
        w = self._weights()
        for z, y in zip(self._augment(features), labels.tolist()):
            p = torch.softmax(w @ z, 0)
            h = max(1.0 - float(p @ p), _MIN_CURVATURE)
            sigma = self._sigma / self.forgetting
            sz = sigma @ z
            sigma = sigma - torch.outer(sz, sz) / (1.0 / h + float(z @ sz))
            self._sigma = (sigma + sigma.T) / 2  # keep it symmetric against rounding
            p[y] -= 1.0
            w -= torch.outer(p, self._sigma @ z)
            self.updates += 1
        fin = self.layer.in_features
        self.layer.weight.copy_(w[:, :fin].to(self.layer.weight))
        if self.layer.bias is not None:
            self.layer.bias.copy_(w[:, fin].to(self.layer.bias))

    def variance(self, features: torch.Tensor) -> torch.Tensor:
        """Predictive variance z' Sigma z of each sample's logits (B,)."""
        z = self._augment(features)
        return ((z @ self._sigma) * z).sum(1)

    def status(self) -> dict:
        return {"updates": self.updates, "trace": round(float(self._sigma.diagonal().sum()), 6)}
