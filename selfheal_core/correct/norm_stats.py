"""Normalisation-statistics adaptation that works at request batch size 1.

BatchNorm layers normalise with running statistics estimated on training data;
under covariate shift those are wrong (Schneider et al. 2020). Instead of batch
statistics (useless for one input), each BN layer's input moments are folded
into a per-sample exponential moving average across requests, starting from
the source statistics, and written into `running_mean` / `running_var`.

The moments are folded inside the served forward itself, layer by layer, by a
forward pre-hook (RoTTA's robust BatchNorm does the same): each layer folds
its batch's per-sample moments into its EMA and normalises the batch with the
result. The batch's own share is 1 - (1 - momentum)^B: 1% at batch 1, 47% at
batch 64. Every layer's input is then what the layers before it make of this
batch with statistics that already include it, so the layers' estimates agree.
Folded afterwards from inputs kept during forwards normalised with earlier
statistics (as before), each layer's input came through layers whose
statistics were about to change: on a ResNet-20 (19 BatchNorm layers) the
estimates chased each other and the served error swung between 0.1 and 0.97
within one Fashion-MNIST-C domain, at batch 1 ending far above the unadapted
model's (zoom blur: 0.22 source, 0.85 adapted; now 0.13); the 2-layer digits
CNN never showed it.

What a fold costs is the number of array calls it makes, not their size (a few
microseconds each on vectors of tens of channels, several times that when the
worker wakes for a request). So each layer keeps its five moment EMAs in one
array that a batch is folded into with one product, a sample's channel means
and mean squares are two reductions, and the factors that shrink the live
moments to the source's are computed every `SHRINK_EVERY` samples and served
in between. A forward with folding (one thread, measured interleaved with the
code before): digits CNN at batch 1 0.66 -> 0.56 ms (plain 0.21); ResNet-20 at
batch 1 8.7 -> 7.5 ms (plain 3.7), at batch 8 21.0 -> 19.0 ms (plain 13.5).

The serving thread owns the moments: only the hooks (inside its forward) and
`apply` (before it) change them; `reset` from another thread is carried out at
the next `apply`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from selfheal_core.correct.base import Corrector, Observation, array_ops, ema_weights, shrink_factors, shrunk

# samples folded in between two computations of the factors that shrink the live moments to the
# source's (see _fold). Computed in every forward they were some forty of a fold's eighty-odd array
# calls. Served late, they lag a shift: Fashion-MNIST-C continual, ResNet-20 at batch 1, served error
# against computing them every forward: every 16 samples +0.5 points (500 images a domain) and +1.7
# (100 a domain), every 8 +0.0 and +1.0, every 4 -0.2 and +0.0 (correlated -0.9, long +0.1). From a
# batch of 4 on, every forward computes them as before
SHRINK_EVERY = 4


class NormStatsAdapter(Corrector):
    """EMA of BatchNorm input moments from live traffic (a no-op for models without BN)."""

    name = "norm_stats"
    _state_keys = ("_mean", "_sq", "_noise", "_shrink", "_since_shrink", "_active", "_samples")

    def __init__(self, layers: tuple[nn.Module, ...] | list[nn.Module], momentum: float = 0.01,
                 noise_se: float = 2.0) -> None:
        if not 0 < momentum <= 1:
            raise ValueError(f"need momentum in (0, 1], got {momentum}")
        super().__init__()
        self.momentum = momentum
        self.noise_se = noise_se  # live moments this close to the source's are taken as noise
        self._reset_pending = False  # a reset asked for off the serving thread, done at the next apply()
        self._layers = list(layers)
        self._source = [(m.running_mean.clone(), m.running_var.clone()) for m in self._layers]
        # the source variances as the layers floor them: fixed, so floored once, not in every forward
        self._source_var = [var.clamp_min(m.eps) for (_, var), m in zip(self._source, self._layers)]
        self._recording = False
        self._keep: torch.Tensor | None = None  # rows of the forward being recorded that may be folded
        self._hooks: list = []  # registered only while adapting: an idle hook still costs every forward
        self._reset()

    def _reset(self) -> None:
        # per layer (5, C), replaced, never changed in place: the EMAs of one sample's channel mean
        # and mean square, and their noise: of z^2, q^2 and z q, where z and q are that mean and mean
        # square about the source mean, started where one Gaussian value per sample would put them
        # (the most noise a feature map can have). One array, so a forward folds a batch into all
        # five with one product (a call's overhead is the cost here)
        self._ema = [self._fresh_ema(i) for i in range(len(self._layers))]
        # per layer (2, C): the shares of the live mean's and log-variance's differences from the
        # source's that are served (base.shrink_factors), as of the forward that last computed them
        self._shrink = [self._factors(i, self._ema[i]) for i in range(len(self._layers))]
        self._since_shrink = SHRINK_EVERY  # samples folded since: the first forward computes them
        self._refresh = False  # whether the forward being recorded computes them
        self._refreshed: dict[int, torch.Tensor] = {}  # layer -> the factors that forward computed
        self._stats = self._source  # per layer (mean, var) that apply() writes: the source until adapted
        self._active = False
        self._samples = 0  # samples folded in since activation
        self._folded = 0  # rows the forward being recorded folded
        self._folding: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._applied: object = None  # the moments last written into the layers

    def _fresh_ema(self, i: int) -> torch.Tensor:
        mu, var = self._source[i]
        return torch.stack([mu, var + mu ** 2, var, 3 * var ** 2, torch.zeros_like(var)])

    # the saved state keeps the EMAs' rows under the names they always had
    @property
    def _mean(self) -> list[torch.Tensor]:
        return [e[0] for e in self._ema]

    @property
    def _sq(self) -> list[torch.Tensor]:
        return [e[1] for e in self._ema]

    @property
    def _noise(self) -> list[torch.Tensor]:
        return [e[2:] for e in self._ema]

    def _make_hook(self, i: int):
        def hook(layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if self._recording:
                x = inputs[0].detach()  # (B, C, ...)
                if self._keep is not None:
                    x = x[self._keep]  # rows outside the plausible range never reach the statistics
                self._fold(i, layer, x)
        return hook

    def _fold(self, i: int, layer: nn.Module, x: torch.Tensor) -> None:
        """Serving thread, inside the forward: fold the batch's per-sample moments into layer i's EMA
        and normalise the batch with the result. The per-channel arithmetic runs on NumPy views
        on the CPU (base.array_ops: a call's overhead is the cost here) and on tensors elsewhere;
        the EMAs are new arrays each time, never changed in place."""
        n = len(x)
        as_array, as_tensor = _arithmetic(x)
        mean, sq = _sample_moments(x, as_array)  # (N, C) each
        xp = array_ops(mean)
        src_mu, src_var = as_array(self._source[i][0]), as_array(self._source_var[i])
        z = mean - src_mu  # about a fixed centre, so folding a batch at once equals one sample at a time
        q = sq - src_mu * (mean + z)  # sq - 2 src_mu mean + src_mu^2
        values = xp.stack([mean, sq, z * z, q * q, z * q], 1)  # (N, 5, C)
        prev = as_array(self._ema[i])
        if n == 1:  # batch 1, the common serving case: no weight vector to build
            ema = prev * (1.0 - self.momentum) + self.momentum * values[0]
        else:
            w, old = ema_weights(n, self.momentum, mean)
            ema = prev * old + (w @ values.reshape(n, -1)).reshape(prev.shape)
        if self._refresh:
            factors = self._factors(i, ema, as_array)
            self._refreshed[i] = as_tensor(factors)
        else:
            factors = as_array(self._shrink[i])
        mu, var = self._served_moments(ema, factors, src_mu, src_var, layer.eps)
        self._ema[i] = as_tensor(ema)
        mu, var = as_tensor(mu), as_tensor(var)
        layer.running_mean.copy_(mu)
        layer.running_var.copy_(var)
        self._folding[i] = (mu, var)
        self._folded = max(self._folded, n)

    @property
    def enabled(self) -> bool:
        return bool(self._layers)

    def activate(self) -> None:
        self._active = True  # the hooks follow at the next apply(), on the serving thread

    def sync_hooks(self) -> None:
        """Serving thread: capture hooks on the layers exactly while active."""
        if self._active and not self._hooks:
            self._hooks = [layer.register_forward_pre_hook(self._make_hook(i)) for i, layer in enumerate(self._layers)]
        elif not self._active and self._hooks:
            for handle in self._hooks:
                handle.remove()
            self._hooks = []

    @contextmanager
    def recording(self, keep: torch.Tensor | None = None) -> Iterator[None]:
        """Fold the BN inputs of the forward pass run inside this block into the statistics, layer by
        layer as it runs; `keep` (B,) bool: only these rows (None: all)."""
        self._recording = self._active and self.enabled
        if keep is not None and bool(keep.all()):
            keep = None  # every row may be folded: no per-layer selection
        elif keep is not None and not bool(keep.any()):
            self._recording = False  # nothing in this forward may reach the statistics
        self._keep = keep
        self._folded = 0
        self._folding: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (mean, var) this forward
        # every layer of one forward computes its shrink factors, or none does
        self._refresh = self._since_shrink >= SHRINK_EVERY
        self._refreshed = {}
        try:
            yield
        finally:
            if self._recording and self._folded:
                self._samples += self._folded
                if self._refresh:
                    self._shrink = [self._refreshed.get(i, f) for i, f in enumerate(self._shrink)]
                    self._since_shrink = 0
                self._since_shrink += self._folded
                # one reference swap, from what the hooks computed (layers this forward did not reach
                # keep theirs): the layers hold them already
                self._stats = [self._folding.get(i, st) for i, st in enumerate(self._stats)]
                self._applied = self._stats
            self._recording = False
            self._keep = None

    def observe(self, obs: Observation | None = None) -> None:
        """Nothing to do: the moments are folded inside the served forward (see the module)."""

    def _adapted(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (mean, var) to normalise with: the live moments, shrunk to the source's noise."""
        return [self._adapted_layer(i) for i in range(len(self._layers))]

    def _adapted_layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (mean, var) from its EMAs and shrink factors, computed as the served forward
        computes them (a restored state normalises exactly as the one saved)."""
        as_array, as_tensor = _arithmetic(self._ema[i])
        src_mu, src_var = as_array(self._source[i][0]), as_array(self._source_var[i])
        mu, var = self._served_moments(as_array(self._ema[i]), as_array(self._shrink[i]), src_mu, src_var,
                                       self._layers[i].eps)
        return as_tensor(mu), as_tensor(var)

    def _served_moments(self, ema, factors, src_mu, src_var, eps: float):
        """(mean, var) to normalise with: the live moments of one layer's EMAs (5, C), shrunk to the
        source's by `factors` (2, C) (tensors or NumPy arrays, base.array_ops); `src_var`: the
        source's, floored at `eps` (`_source_var`)."""
        mu = ema[0]
        var = array_ops(ema).clamp_min(ema[1] - mu * mu, eps)
        if self.noise_se <= 0:
            return mu, var
        return shrunk(mu, var, src_mu, src_var, factors[0], factors[1])

    def _factors(self, i: int, ema, as_array: Callable | None = None):
        """Layer i's shrink factors (2, C) from its EMAs (5, C) (base.shrink_factors): how far the
        live moments stand from the source's against their own noise."""
        as_array = as_array or (lambda t: t)
        mu, sq, zz, qq, zq = ema
        src_mu, src_var = as_array(self._source[i][0]), as_array(self._source_var[i])
        xp = array_ops(ema)
        if self.noise_se <= 0:
            return xp.stack([xp.ones_like(mu)] * 2)  # all kept (_served_moments serves the live moments)
        var = xp.clamp_min(sq - mu * mu, self._layers[i].eps)
        ez = mu - src_mu
        ez2 = ez * ez
        eq = var + ez2
        spread = xp.clamp_min(zz - ez2, 0.0)  # variance of one sample's mean
        # variance of one sample's contribution to var = E q - (E z)^2 (delta method), relative
        var_spread = xp.clamp_min((qq - eq * eq) - 4 * ez * (zq - ez * eq) + 4 * ez2 * spread, 0.0) / (var * var)
        return xp.stack(shrink_factors(mu, var, src_mu, src_var, self.momentum, self.noise_se, spread, var_spread))

    @torch.no_grad()
    def apply(self) -> None:
        """Serving thread: a pending reset, the hooks, and the statistics into the layers."""
        if self._reset_pending:
            self._reset_pending = False
            active = self._active  # as activate() after the reset left it
            self._reset()
            self._active = active
        self.sync_hooks()
        stats = self._stats  # the source's own tensors until something is folded in: restored exactly
        if stats is self._applied:
            return
        for layer, (mu, var) in zip(self._layers, stats):
            layer.running_mean.copy_(mu)
            layer.running_var.copy_(var)
        self._applied = stats

    def load_state_dict(self, state: dict) -> None:
        """The saved rows packed back into each layer's EMAs, on that layer's device (snapshots load
        on the CPU). A state saved before the noise was tracked gets the most noise a map can have."""
        self.check_state_keys(state, optional=("_noise", "_shrink", "_since_shrink"))
        layers = len(self._layers)
        lists = [k for k in ("_mean", "_sq", "_noise", "_shrink") if k in state]
        if any(not isinstance(state[k], (list, tuple)) or len(state[k]) != layers for k in lists):
            raise ValueError(f"NormStatsAdapter state does not hold {layers} layers")
        if ("_shrink" in state) != ("_since_shrink" in state):
            raise ValueError("NormStatsAdapter state has one of _shrink and _since_shrink without the other")
        ema, shrink = [], []
        for i, layer in enumerate(self._layers):
            fresh = self._fresh_ema(i)
            try:
                noise = state["_noise"][i] if "_noise" in state else fresh[2:]
                packed = torch.cat([torch.stack([state["_mean"][i], state["_sq"][i]]), noise])
            except (TypeError, RuntimeError) as exc:
                raise ValueError(f"NormStatsAdapter state, layer {i}: {exc}") from None
            factors = state["_shrink"][i] if "_shrink" in state else None
            if packed.shape != fresh.shape or (factors is not None and (
                    not isinstance(factors, torch.Tensor) or factors.shape != (2,) + fresh.shape[1:])):
                raise ValueError(f"NormStatsAdapter state, layer {i}: its moments do not fit {tuple(fresh.shape[1:])} "
                                 "channels")
            ema.append(packed.to(fresh.device, fresh.dtype).clone())
            # saved when every forward computed them: from the moments, as that forward did
            shrink.append(self._factors(i, ema[i]) if factors is None else factors.to(fresh.device, fresh.dtype).clone())
        self._ema, self._shrink = ema, shrink
        self._since_shrink = int(state.get("_since_shrink", 0))
        self._active, self._samples = bool(state["_active"]), int(state["_samples"])
        self._stats = self._adapted()
        self._applied = None
        self._reset_pending = False

    def moments(self) -> dict:
        """The adapted statistics, for a learner that trains with what serving normalises with."""
        stats = self._stats
        return {"active": self._active, "mean": [m.cpu() for m, _ in stats], "sq": [(v + m ** 2).cpu() for m, v in stats]}

    def reset(self) -> None:
        """Restore the source statistics exactly and stop adapting, at the next `apply` (the serving
        thread's: it owns the moments)."""
        self._active = False
        self._reset_pending = True

    def finite(self) -> bool:
        """Whether the statistics served are all finite."""
        return all(bool(torch.isfinite(m).all() and torch.isfinite(v).all()) for m, v in self._stats)

    def status(self) -> dict:
        return {"layers": len(self._layers), "active": self._active, "samples": self._samples}


def _sample_moments(x: torch.Tensor, as_array: Callable) -> tuple:
    """Each sample's channel mean and mean square (N, C) of a BatchNorm input (N, C, ...), as
    `as_array` makes them: two reductions over a flat view (a sum, a 2-norm) where the input's
    float type keeps the sum safe, else means in the input's own type."""
    if x.dim() == 2:
        mean = as_array(x)
        return mean, mean * mean
    flat = x.flatten(2)
    if x.dtype in (torch.float32, torch.float64):
        scale = 1.0 / flat.shape[2]
        norm = as_array(torch.linalg.vector_norm(flat, dim=2))
        return as_array(flat.sum(2)) * scale, norm * norm * scale
    return as_array(flat.mean(2)), as_array((flat * flat).mean(2))


def _to_host(dtype: torch.dtype) -> Callable:
    return lambda t: (t if t.dtype == dtype else t.to(dtype)).numpy()


# per dtype, built once: the served forward asks for them in every layer
_HOST = {dtype: (_to_host(dtype), torch.from_numpy) for dtype in (torch.float32, torch.float64)}


def _arithmetic(like: torch.Tensor) -> tuple[Callable, Callable]:
    """(to arrays, back to tensors) for the per-channel arithmetic on `like`'s moments: NumPy views
    of the same memory for float tensors on the CPU, tensors on `like`'s device and dtype otherwise."""
    if like.device.type == "cpu" and like.dtype in _HOST:
        return _HOST[like.dtype]
    return (lambda t: t.to(like.device, like.dtype)), (lambda a: a)
