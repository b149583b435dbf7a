"""What the tabular benchmarks share: the MLP, pretraining, the methods side by side (static, selfheal,
river's online learners, the last label seen) and the prequential loop in requests of `REQUEST`."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfheal_bench.train import fit
from selfheal_core import HealConfig, SelfHealer

REQUEST = 16


class Standardise(nn.Module):
    """Inputs standardised inside the model with the pretraining set's moments."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def make_mlp(d: int, out: int, batchnorm: bool, x: torch.Tensor) -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Linear(i, o)] + ([nn.BatchNorm1d(o)] if batchnorm else []) + [nn.ReLU()]
    return nn.Sequential(Standardise(x.mean(0), x.std(0).clamp_min(1e-6)), *block(d, 64), *block(64, 64),
                         nn.Linear(64, out))


def pretrain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str, epochs: int, seed: int) -> nn.Module:
    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, target.long()) if task == "classification" else F.mse_loss(out[:, 0], target)
    return fit(model, x, y, epochs, loss=loss, seed=seed)


class Static:
    """The pretrained model, never updated."""

    def __init__(self, model: nn.Module, task: str) -> None:
        self.model, self.task = model.eval(), task

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        out = self.model(torch.from_numpy(x))
        return (out.argmax(1) if self.task == "classification" else out[:, 0]).numpy()

    def learn(self, x: np.ndarray, y: np.ndarray, served: np.ndarray) -> None:
        pass


class Heal(Static):
    """SelfHealer around the MLP with `config`, its labelled reference (x_ref, y_ref)."""

    def __init__(self, model: nn.Module, task: str, x_ref: torch.Tensor, y_ref: torch.Tensor,
                 config: HealConfig) -> None:
        super().__init__(model, task)
        labels = y_ref.long() if task == "classification" else y_ref[:, None]
        self.healer = SelfHealer(model, x_ref, config, task=task, reference_labels=labels)

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = self.healer.predict(torch.from_numpy(x))
        return (out.argmax(1) if self.task == "classification" else out[:, 0]).numpy()

    def learn(self, x: np.ndarray, y: np.ndarray, served: np.ndarray) -> None:
        xt = torch.from_numpy(x)
        if self.task == "classification":
            self.healer.feedback(xt, torch.from_numpy(y).long(), served=torch.from_numpy(served).long())
        else:
            self.healer.feedback(xt, torch.from_numpy(y)[:, None])


class River:
    """A river online learner, one row at a time."""

    def __init__(self, model, keys: list[str], task: str) -> None:
        self.model, self.keys, self.task = model, keys, task

    def _rows(self, x: np.ndarray) -> list[dict]:
        return [dict(zip(self.keys, map(float, row))) for row in x]

    def predict(self, x: np.ndarray) -> np.ndarray:
        default = 0 if self.task == "classification" else 0.0
        out = [self.model.predict_one(r) for r in self._rows(x)]
        return np.array([default if v is None else v for v in out], dtype=np.float32)

    def learn(self, x: np.ndarray, y: np.ndarray, served: np.ndarray) -> None:
        for r, t in zip(self._rows(x), y):
            self.model.learn_one(r, int(t) if self.task == "classification" else float(t))


def river_models(task: str, seed: int) -> dict:
    from river import forest, tree

    if task == "classification":
        return {"arf": forest.ARFClassifier(seed=seed), "hat": tree.HoeffdingAdaptiveTreeClassifier(seed=seed)}
    return {"arf": forest.ARFRegressor(seed=seed), "hat": tree.HoeffdingAdaptiveTreeRegressor(seed=seed)}


def prequential(method, x: np.ndarray, y: np.ndarray, rate: float, seed: int) -> tuple[np.ndarray, float]:
    """Per-sample predictions (predict each request, then learn its labelled share) and seconds taken."""
    rng = np.random.default_rng(seed)
    preds = np.empty(len(y), dtype=np.float32)
    start = time.perf_counter()
    for i in range(0, len(y), REQUEST):
        xb, yb = x[i:i + REQUEST], y[i:i + REQUEST]
        served = method.predict(xb)
        preds[i:i + REQUEST] = served
        chosen = rng.random(len(yb)) < rate if rate < 1 else np.ones(len(yb), dtype=bool)
        if chosen.any():
            method.learn(xb[chosen], yb[chosen], served[chosen])
    return preds, time.perf_counter() - start


def score(task: str, preds: np.ndarray, y: np.ndarray) -> float:
    return float((preds == y).mean()) if task == "classification" else float(((preds - y) ** 2).mean())


class LastLabel:
    """The no-change baseline: every prediction is the last label seen."""

    def __init__(self, first: float = 0.0) -> None:
        self.last = first

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(x), self.last, dtype=np.float32)

    def learn(self, x: np.ndarray, y: np.ndarray, served: np.ndarray) -> None:
        self.last = float(y[-1])
