"""What selfheal can see and change in a user's model, found once at load.

- the output head: the last `nn.Linear` whose width is the model's output
  width; its input (the penultimate features) is what the feature-shift
  detector watches and what the Bayesian last layer updates;
- normalisation layers: BatchNorm (statistics to adapt), LayerNorm and
  GroupNorm (affine parameters to adapt);
- whether the model takes hooks at all (a TorchScript module does not: such a
  model is served monitor-only).

`FeatureTap` registers the one forward pre-hook selfheal keeps on a model;
every hook is removable, and a constructor that fails removes what it
registered, so the user's model is left as it was handed over.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from selfheal_core.learn.compact import widen

log = logging.getLogger(__name__)

_BN = nn.modules.batchnorm._BatchNorm
_AFFINE_NORMS = (nn.LayerNorm, nn.GroupNorm)
MAX_INPUT_FEATURES = 512  # inputs watched directly (no head to tap) are pooled to at most this many values


def is_scripted(model: nn.Module) -> bool:
    return isinstance(model, torch.jit.ScriptModule)


@dataclass(frozen=True)
class ModelParts:
    """The parts of a model selfheal uses; None/empty where the model has none."""

    head_name: str | None  # module name of the output Linear
    head: nn.Linear | None
    batchnorms: tuple[nn.Module, ...]  # BatchNorm layers tracking running statistics
    affine_norms: tuple[tuple[str, nn.Module], ...]  # LayerNorm/GroupNorm layers with affine parameters
    scripted: bool

    def describe(self) -> dict:
        return {"head": self.head_name, "batchnorm_layers": len(self.batchnorms),
                "affine_norm_layers": len(self.affine_norms), "scripted": self.scripted}


def find_parts(model: nn.Module, output_width: int) -> ModelParts:
    """Inspect `model` (eager or TorchScript) whose outputs have `output_width` values per input."""
    if is_scripted(model):
        return ModelParts(None, None, (), (), True)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    heads = [(n, m) for n, m in linears if m.out_features == output_width]
    head_name, head = heads[-1] if heads else (None, None)
    bns = tuple(m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats
                and m.running_mean is not None)
    affine = tuple((n, m) for n, m in model.named_modules()
                   if isinstance(m, _AFFINE_NORMS) and getattr(m, "weight", None) is not None)
    return ModelParts(head_name, head, bns, affine, False)


def detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of an eager model for a learner to train; the original is untouched."""
    return copy.deepcopy(model)


def pool_inputs(x: torch.Tensor, limit: int = MAX_INPUT_FEATURES) -> torch.Tensor:
    """Inputs (B, ...) as (B, <= limit) float64 on the CPU: flattened, then averaged over
    consecutive blocks when longer (neighbouring pixels of an image, for instance)."""
    flat = x.detach().reshape(len(x), -1).to("cpu", torch.float64)
    d = flat.shape[1]
    if d <= limit:
        return flat
    block = -(-d // limit)  # ceil
    pad = block * limit - d
    if pad:
        flat = torch.cat([flat, flat[:, -1:].expand(-1, pad)], 1)
    return flat.view(len(flat), limit, block).mean(2)


class FeatureTap:
    """Keeps the input of the head seen by the last forward (a removable forward pre-hook).

    The hook is a closure, not a bound method: a deep copy of the model (a learner's copy)
    then shares the function instead of trying to copy this object.
    """

    def __init__(self, head: nn.Linear) -> None:
        slot: list[torch.Tensor | None] = [None]
        self._slot = slot

        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            slot[0] = inputs[0].detach()

        self._handle = head.register_forward_pre_hook(hook)

    def take(self) -> torch.Tensor | None:
        """The features (B, F) of the last forward, flattened; clears them."""
        feats, self._slot[0] = self._slot[0], None
        return None if feats is None else feats.flatten(1)

    def remove(self) -> None:
        self._handle.remove()


class ActivationBudget:
    """How many inputs one forward of `model` may take within `budget` bytes of activations
    (at most `cap`): 256 224x224 images through a ResNet-18 at once held ~800 MB in its first
    layer alone. The bytes of one input's activations are measured on `example` (1, ...) at
    construction, before anything hooks the model (a measuring forward later would fire the
    owner's hooks), or else at the first call."""

    def __init__(self, model: nn.Module, budget: int, cap: int = 256, example: torch.Tensor | None = None) -> None:
        self.model, self.budget, self.cap = model, budget, cap
        self.per_input: int | None = None
        if example is not None and len(example):
            self._measure(example[:1])

    def _measure(self, x1: torch.Tensor) -> None:
        param = next(iter(self.model.parameters()), None)
        x1 = x1.to(param.device if param is not None else x1.device)
        if x1.dtype == torch.float16 and param is not None and param.dtype != torch.float16:
            x1 = x1.to(param.dtype)  # an input kept compact (learn/compact.py) is read widened
        self.per_input = activation_bytes(self.model, x1)

    def rows(self, x: torch.Tensor) -> int:
        """Inputs per forward for a batch like x (B, ...): at least 1, at most `cap` and len(x)."""
        if self.per_input is None and len(x):
            self._measure(x[:1])
        return max(1, min(self.cap, len(x), self.budget // max(1, self.per_input or 1)))

    def batches(self, x: torch.Tensor, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
        """x (B, ...) in slices of `rows(x)` inputs, each at `dtype` (inputs kept compact are read
        widened) and on `device` where given: one forward each stays within the budget."""
        rows = self.rows(x)
        for i in range(0, len(x), rows):
            xb = x[i:i + rows]
            if dtype is not None:
                xb = widen(xb, dtype)
            yield xb if device is None else xb.to(device)


@torch.no_grad()
def activation_bytes(model: nn.Module, x1: torch.Tensor) -> int:
    """Bytes every leaf module's output holds for one input `x1` (1, ...): what a forward of one
    input keeps for its backward, and bounds what a batch of them needs at once. TorchScript
    takes no hooks: 16x the input's bytes stands in."""
    if isinstance(model, torch.jit.ScriptModule):  # no hooks on TorchScript: a bound from the input alone
        return max(1, 16 * x1.numel() * x1.element_size())
    sizes: list[int] = []

    def count(_m, _i, out) -> None:
        sizes.append(out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0)

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        model(x1)
    finally:
        for h in hooks:
            h.remove()
    return max(1, sum(sizes))
