"""Published label-free test-time adaptation methods, our own implementations, as benchmark peers.

Each method is called on one request batch: it predicts first (the returned
classes come from the forward before its own update), then adapts. All
gradient methods update the affine parameters of the normalisation layers
(BatchNorm, LayerNorm, GroupNorm) with TENT's optimiser (Adam, 1e-3), and
BatchNorm layers use the batch's own statistics, as each paper does. One
setting for all keeps the comparison about the method, not its tuning.

- TENT (Wang et al., ICLR 2021): entropy of every sample.
- EATA (Niu et al., ICML 2022): entropy of reliable (entropy < 0.4 ln C) and
  non-redundant (cosine similarity to the running mean prediction < 0.05)
  samples, weighted by exp(E0 - H); a Fisher-weighted pull towards the source
  parameters (Fisher from the labelled reference, alpha 2,000).
- SAR (Niu et al., ICLR 2023): reliable entropy with sharpness-aware
  minimisation (rho 0.05, a second reliable filter on the perturbed loss) and
  a reset to the source when the loss's moving average falls below 0.2.
- LAME (Boudiaf et al., CVPR 2022): no parameter changes; the batch's
  predictions are adjusted by Laplacian regularisation over a kNN affinity
  (k = 5) of the L2-normalised head inputs. At batch size 1 it is the source.
- ROID (Marsden et al., WACV 2024): soft likelihood ratio loss, certainty and
  diversity weighting (temperature 1/3, prior momentum 0.9), weight
  ensembling with the source (momentum 0.99) and prior correction of the
  outputs. The augmentation-consistency term is left out: the paper's image
  augmentations (crops, flips, colour jitter) do not apply to 8x8 digits or
  to tabular rows.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def norm_affine(model: nn.Module, batch_stats: bool = True) -> list[nn.Parameter]:
    """Freeze everything but normalisation affine parameters; BatchNorm then uses batch statistics."""
    model.eval()
    model.requires_grad_(False)
    params = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and batch_stats:
            m.train()
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
        if isinstance(m, NORMS):
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(True)
                    params.append(p)
    return params


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.log_softmax(1)
    return -(logp.exp() * logp).sum(1)


def last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("no nn.Linear head to split the model at")
    return linears[-1]


class Source:
    name = "source"

    def __init__(self, model: nn.Module, **_) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).argmax(1)


class NormBatchStats(Source):
    """Schneider et al. 2020: normalise with the test batch's own statistics (BatchNorm models only)."""

    name = "norm_stats"

    def __init__(self, model: nn.Module, **_) -> None:
        super().__init__(model)
        norm_affine(model)


class Tent(Source):
    name = "tent"

    def __init__(self, model: nn.Module, lr: float = 1e-3, **_) -> None:
        super().__init__(model)
        self.params = norm_affine(model)
        self.opt = torch.optim.Adam(self.params, lr=lr) if self.params else None

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        return entropy(logits).mean()

    @torch.enable_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if self.opt is not None:
            loss = self.loss(logits)
            if loss.requires_grad:
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
        return logits.detach().argmax(1)


class Eata(Tent):
    name = "eata"

    def __init__(self, model: nn.Module, reference: torch.Tensor | None = None, margin: float = 0.4,
                 d_margin: float = 0.05, fisher_alpha: float = 2000.0, **kw) -> None:
        super().__init__(model, **kw)
        self.d_margin, self.alpha = d_margin, fisher_alpha
        self.e0 = None if margin is None else margin
        self.mean_probs: torch.Tensor | None = None
        self.anchor = [p.detach().clone() for p in self.params]
        self.fisher = [torch.zeros_like(p) for p in self.params]
        if reference is not None and self.params:  # Fisher of the pseudo-label loss on clean data
            for xb in reference.split(64):
                logits = model(xb)
                model.zero_grad()
                F.cross_entropy(logits, logits.argmax(1)).backward()
                for f, p in zip(self.fisher, self.params):
                    f += p.grad.detach() ** 2 / math.ceil(len(reference) / 64)
            model.zero_grad()

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        e0 = self.e0 * math.log(logits.shape[1])
        ent = entropy(logits)
        keep = ent < e0
        probs = logits.softmax(1)
        if self.mean_probs is not None:
            keep &= F.cosine_similarity(self.mean_probs[None], probs, dim=1).abs() < self.d_margin
        if keep.any():
            kept = probs[keep].detach().mean(0)
            self.mean_probs = kept if self.mean_probs is None else 0.9 * self.mean_probs + 0.1 * kept
        loss = (ent[keep] * torch.exp(e0 - ent[keep].detach())).sum() / max(len(logits), 1)
        reg = sum((f * (p - a) ** 2).sum() for f, p, a in zip(self.fisher, self.params, self.anchor))
        return loss + self.alpha * reg


class Sar(Tent):
    name = "sar"

    def __init__(self, model: nn.Module, margin: float = 0.4, rho: float = 0.05, reset_below: float = 0.2,
                 **kw) -> None:
        super().__init__(model, **kw)
        self.margin, self.rho, self.reset_below = margin, rho, reset_below
        self.source = copy.deepcopy(model.state_dict())
        self.source_opt = copy.deepcopy(self.opt.state_dict()) if self.opt else None
        self.ema: float | None = None

    @torch.enable_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if self.opt is None:
            return logits.detach().argmax(1)
        e0 = self.margin * math.log(logits.shape[1])
        ent = entropy(logits)
        keep = ent < e0
        if keep.any():
            self.opt.zero_grad()
            ent[keep].mean().backward()
            # SAM: climb to the worst point within rho, take the gradient there, step from the start
            grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]
            norm = torch.norm(torch.stack([g.norm() for g in grads])) + 1e-12
            eps = [g * self.rho / norm for g in grads]
            with torch.no_grad():
                for p, e in zip(self.params, eps):
                    p.add_(e)
            self.opt.zero_grad()
            ent2 = entropy(self.model(x))
            keep2 = ent2 < e0
            second = ent2[keep2].mean() if keep2.any() else None
            if second is not None:
                second.backward()
            with torch.no_grad():
                for p, e in zip(self.params, eps):
                    p.sub_(e)
            if second is not None:
                self.opt.step()
                value = float(second.detach())
                self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value
                if self.ema < self.reset_below:  # model recovery: collapsed to over-confidence
                    self.model.load_state_dict(self.source)
                    self.opt.load_state_dict(self.source_opt)
                    self.ema = None
            self.opt.zero_grad()
        return logits.detach().argmax(1)


def laplacian(unary: torch.Tensor, kernel: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """LAME's bound optimisation of the Laplacian-regularised assignment (N, K)."""
    y = (-unary).softmax(1)
    old = float("inf")
    for i in range(steps):
        pairwise = kernel @ y
        y = (-unary + pairwise).softmax(1)
        energy = float((unary * y - pairwise * y + y * y.clamp_min(1e-20).log()).sum())
        if i > 1 and abs(energy - old) <= 1e-8 * abs(old):
            break
        old = energy
    return y


class Lame(Source):
    name = "lame"

    def __init__(self, model: nn.Module, knn: int = 5, **_) -> None:
        super().__init__(model)
        self.knn = knn
        self._feats: torch.Tensor | None = None
        last_linear(model).register_forward_pre_hook(lambda _m, a: setattr(self, "_feats", a[0].detach()))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        feats = F.normalize(self._feats.flatten(1), dim=1)
        n = len(feats)
        dist = torch.cdist(feats, feats)
        k = min(self.knn + 1, n)
        kernel = torch.zeros(n, n).scatter_(1, dist.topk(k, largest=False).indices[:, 1:], 1.0)
        return laplacian(-logits.log_softmax(1), kernel).argmax(1)


class Roid(Tent):
    name = "roid"

    def __init__(self, model: nn.Module, temperature: float = 1 / 3, momentum_probs: float = 0.9,
                 momentum_src: float = 0.99, **kw) -> None:
        super().__init__(model, **kw)
        self.temperature, self.momentum_probs, self.momentum_src = temperature, momentum_probs, momentum_src
        self.anchor = [p.detach().clone() for p in self.params]
        self.class_probs: torch.Tensor | None = None

    @staticmethod
    def slr(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
        """Soft likelihood ratio: -sum_c p_c log(p_c / (1 - p_c)); unlike entropy it does not vanish at p -> 1."""
        p = logits.softmax(1).clamp(max=clip)
        return -(p * torch.log(p / (1 - p) + eps)).sum(1)

    @torch.enable_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if self.opt is not None:
            probs = logits.softmax(1).detach()
            if self.class_probs is None:
                self.class_probs = torch.full((logits.shape[1],), 1 / logits.shape[1])
            div = 1 - F.cosine_similarity(self.class_probs[None], probs, dim=1)
            div = (div - div.min()) / (div.max() - div.min() + 1e-12)
            mask = div < div.mean()
            cert = -entropy(logits.detach())
            cert = (cert - cert.min()) / (cert.max() - cert.min() + 1e-12)
            weights = torch.exp(div * cert / self.temperature)
            self.class_probs = self.momentum_probs * self.class_probs + (1 - self.momentum_probs) * probs.mean(0)
            loss = (self.slr(logits) * weights)[~mask].sum() / len(x)
            if loss.requires_grad and bool((~mask).any()):
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
            with torch.no_grad():  # weight ensembling: stay near the source
                for p, a in zip(self.params, self.anchor):
                    p.mul_(self.momentum_src).add_(a, alpha=1 - self.momentum_src)
        logits = logits.detach()
        prior = logits.softmax(1).mean(0)  # prior correction of the outputs
        smooth = max(1 / len(logits), 1 / logits.shape[1]) / prior.max()
        return (logits.softmax(1) * (prior + smooth) / (1 + smooth * logits.shape[1])).argmax(1)


PEERS = {c.name: c for c in (Source, NormBatchStats, Tent, Eata, Sar, Lame, Roid)}
