"""Input-statistics alignment: label-free correction for models without BatchNorm.

A model normalised per sample (LayerNorm, GroupNorm) or not at all has no
statistics to re-estimate, and entropy training of its affine parameters
moves little (measured on the LayerNorm MLP of bench_heal: TENT, EATA, SAR
and ROID all stay within 3 points of the source on continual corruptions).
What does move it is aligning the inputs' per-feature moments with the
reference: each input feature is re-standardised from a per-sample moving
average of live moments to the reference's mean and spread, a BatchNorm in
front of the model whose source statistics are the identity. It measured
0.70 -> 0.44 online error on continual Digits-C, and 0.70 -> 0.49 on
class-correlated streams with a memory of ~330 samples (a short memory
learns the class of the current run as "shift" and removes it: 0.60 at
~100). It works at request batch size 1, costs one multiply-add per input
value, and does not depend on the weights, so learned versions keep it.

Second moments cannot tell an input from its negative (an image negative,
a sensor wired backwards): a positive scale maps an inverted input onto the
reference's mean and spread and leaves it inverted, and the model is then more
confidently wrong than before (bench_heal, invert at severity 5: LayerNorm
MLP 0.92 -> 0.998 error). The third moment's sign does tell: skewness flips
with the sign of the input. When most features whose live and reference
skewness are both clearly non-zero disagree in sign, the input is taken as
mirrored and every feature is mapped with a negative scale. The vote is over
the whole input because a polarity change is one change of the whole input;
features that move by other means (rotated or translated strokes) flip a few
skews and never carry it (measured on Digits-C: 30 of 30 such features
flipped under invert, at most 10 of 30 under any other family). With
`align=False` (models with BatchNorm, whose own statistics adapt after the
input) the transform is the identity unless the input is mirrored.

A slow memory is what keeps rotate and salt-and-pepper from flipping the vote
back and forth, but it also left an inverted input uncorrected for ~190
samples after it began, nearly all of them misclassified (bench_heal
continual, CNN: 11% error on the invert domain). So a second, short memory
(~20 samples) votes too, under a stricter rule (90% of at least 10 voting
features); when it contradicts the current polarity, the live moments restart
from its own. Measured on bench_heal: continual error CNN 0.382 -> 0.374,
LayerNorm MLP 0.365 -> 0.351 (invert 0.113 -> 0.044 and 0.177 -> 0.053), no
restart outside an invert domain; inputs of fewer than 10 skewed features
never pass the stricter vote and keep the slow one alone.

The transform is a forward pre-hook on the model, registered only while
active; `observe` folds the raw inputs of drained batches (the inputs before
the transform) and `apply` publishes the new scale and shift on the serving
thread. Non-finite inputs are skipped: one bad row must not poison the moments.
"""
from __future__ import annotations

import torch
from torch import nn

from selfheal_core.correct.base import Corrector, Observation, ema_weights, shrink_to_source

MIN_VAR = 1e-3  # floor on per-feature variance: constant features (image borders) must not blow up
SKEW_Z = 4.0  # a skewness counts in the polarity vote beyond this many of its standard errors
MIRROR_SHARE = 0.8  # share of the voting features that must disagree in sign for a mirrored input
MIRROR_VOTES = 3  # fewer voting features than this decide nothing
FAST_MOMENTUM = 0.05  # the short memory that notices a polarity change early (~20 samples)
FAST_SHARE = 0.9  # its vote: this share of at least FAST_VOTES voting features (no other Digits-C
FAST_VOTES = 10  # family flips more than a third of them)


class InputStatsAdapter(Corrector):
    """Re-standardise each input feature from live moments to the reference's."""

    name = "input_stats"
    needs_inputs = True
    _state_keys = ("_mean", "_sq", "_cube", "_fast", "_active", "_samples")

    def __init__(self, model: nn.Module, reference: torch.Tensor, momentum: float = 0.003,
                 noise_se: float = 2.0, align: bool = True, polarity: bool = True) -> None:
        if not 0 < momentum <= 1:
            raise ValueError(f"need momentum in (0, 1], got {momentum}")
        if not reference.is_floating_point() or len(reference) < 2:
            raise ValueError("input statistics need a floating-point reference of at least 2 inputs")
        super().__init__()
        self.momentum = momentum
        self.noise_se = noise_se  # live moments this close to the reference's are taken as noise
        self.align = align  # standardise every feature to the reference; False: only undo a mirrored input
        self.name = "input_stats" if align else "input_polarity"
        self.polarity = polarity  # detect a mirrored input by the sign of the skewness
        self.model = model
        flat = reference.detach().reshape(len(reference), -1).double().cpu()
        self._ref_mean = flat.mean(0)
        raw_var = flat.var(0)
        self._ref_var = raw_var.clamp_min(MIN_VAR)
        self._ref_cube = (flat ** 3).mean(0)
        self._ref_skew = _skew(self._ref_mean, raw_var + self._ref_mean ** 2, self._ref_cube)
        self._ref_skew[raw_var <= MIN_VAR] = 0.0  # a constant feature has no polarity to vote with
        self._ref_count = len(flat)  # the reference moments' own error counts in what is noise
        self._shape = tuple(reference.shape[1:])
        self._hook = None
        self._reset()

    def _reset(self) -> None:
        self._mean = self._ref_mean.clone()  # live moments (F,), float64; replaced, never changed in place
        self._sq = self._ref_var + self._ref_mean ** 2
        self._cube = self._ref_cube.clone()
        self._fast = [self._mean, self._sq, self._cube]  # the same three moments with a short memory
        self._samples = 0
        self._active = False
        self._published: tuple[torch.Tensor, torch.Tensor] | None = None  # (scale, shift) for the hook
        self._served: tuple[torch.Tensor, torch.Tensor] | None = None  # what the hook uses (on its device)
        self._applied: object = None  # the published pair last taken by apply()

    def activate(self) -> None:
        self._active = True  # the hook follows at the next apply(), on the serving thread

    def deactivate(self) -> None:
        self._active = False

    def _sync_hook(self) -> None:
        """Serving thread: the transform hook on the model exactly while active."""
        if self._active and self._hook is None:
            self._hook = self.model.register_forward_pre_hook(self._transform)
        elif not self._active and self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _transform(self, _module: nn.Module, args: tuple):
        served = self._served
        x = args[0] if args else None
        if served is None or not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self._shape:
            return None
        scale, shift = served
        if scale.device != x.device or scale.dtype != x.dtype:
            scale, shift = scale.to(x.device, x.dtype), shift.to(x.device, x.dtype)
            self._served = (scale, shift)
        return (x * scale + shift,) + tuple(args[1:])

    @torch.no_grad()
    def observe(self, obs: Observation) -> None:
        if not self._active or obs.inputs is None or not obs.inputs.is_floating_point():
            return
        x = obs.inputs.detach().reshape(len(obs.inputs), -1).to("cpu", torch.float64)
        if x.shape[1] != self._ref_mean.numel():
            return
        x = x[torch.isfinite(x).all(1)]
        if not len(x):
            return
        moments = torch.stack([x, x * x, x ** 3])  # (3, n, F)
        self._mean, self._sq, self._cube = _fold(moments, [self._mean, self._sq, self._cube], self.momentum)
        self._samples += len(x)
        mirrored = self.mirrored  # one vote per observe: _scale_shift takes it
        if self.polarity:
            self._fast = _fold(moments, self._fast, FAST_MOMENTUM)
            fast = self._vote(self._fast, FAST_MOMENTUM, FAST_SHARE, FAST_VOTES)
            if fast is not None and fast != mirrored:
                self._mean, self._sq, self._cube = self._fast  # the polarity changed: restart from the short memory
                mirrored = self.mirrored
        self._published = self._scale_shift(mirrored)

    @property
    def mirrored(self) -> bool:
        """Whether the live inputs are the reference's with their sign flipped (the skewness vote)."""
        return self.polarity and self._vote([self._mean, self._sq, self._cube], self.momentum,
                                            MIRROR_SHARE, MIRROR_VOTES) is True

    def _vote(self, moments: list[torch.Tensor], momentum: float, share: float,
              min_votes: int) -> bool | None:
        """Mirrored (True), not (False) or undecided (None), by the skewness signs of the features
        whose live and reference skewness are both clearly non-zero."""
        live = _skew(*moments)
        c = momentum / (2.0 - momentum)  # an EMA's variance as a share of one sample's
        # se of a skewness estimate from n samples ~ sqrt(6 / n) (Gaussian; heavier tails only widen it)
        votes = ((live.abs() > SKEW_Z * (6 * c) ** 0.5)
                 & (self._ref_skew.abs() > SKEW_Z * (6 / self._ref_count) ** 0.5))
        total, flipped = int(votes.sum()), int((votes & (live * self._ref_skew < 0)).sum())
        if total < min_votes:
            return None
        if flipped >= share * total:
            return True
        return False if total - flipped >= share * total else None

    def _scale_shift(self, mirrored: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(scale, shift) mapping the live moments onto the reference's, shaped like one input;
        None for the identity (align=False and the input is not mirrored)."""
        sign = -1.0 if mirrored else 1.0
        if not self.align and sign > 0:
            return None
        mean, var = shrink_to_source(self._mean, (self._sq - self._mean ** 2).clamp_min(MIN_VAR),
                                     self._ref_mean, self._ref_var, self.momentum, self.noise_se,
                                     src_count=self._ref_count)
        scale = sign * (self._ref_var / var).sqrt()
        shape = (1,) + self._shape
        return scale.float().view(shape), (self._ref_mean - mean * scale).float().view(shape)

    def apply(self) -> None:
        """Serving thread: the hook uses the newest scale and shift from the next forward on."""
        self._sync_hook()
        published = self._published
        if published is not self._applied:
            self._served, self._applied = published, published

    def transform(self) -> dict | None:
        """The (scale, shift) the hook applies to every input now, on the CPU, for a learner that must
        train on what the model was given (issue 27: trained on raw inputs, its updates fought the
        polarity fix); None while no transform is served."""
        applied = self._applied if self._hook is not None else None
        if applied is None:
            return None
        return {"scale": applied[0].detach().cpu(), "shift": applied[1].detach().cpu()}

    def reset(self) -> None:
        """Back to the source (no transform), inactive."""
        self._reset()

    def remove(self) -> None:
        """Serving thread (or at close): take the hook off the user's model now."""
        self._active = False
        self._sync_hook()

    def finite(self) -> bool:
        """Whether the live moments and the transform served from them are all finite."""
        published = self._published
        return bool(torch.isfinite(self._mean).all() and torch.isfinite(self._sq).all()
                    and torch.isfinite(self._cube).all()
                    and (published is None or all(torch.isfinite(t).all() for t in published)))

    def load_state_dict(self, state: dict) -> None:
        """As StateMixin; a state saved before the third moment was kept gets one with the
        reference's skewness (not mirrored), one saved before the short memory its long one."""
        if "_cube" not in state and "_mean" in state and "_sq" in state:
            mean, sq = state["_mean"], state["_sq"]
            var = (sq - mean ** 2).clamp_min(MIN_VAR)
            state = {**state, "_cube": self._ref_skew * var ** 1.5 + 3 * mean * sq - 2 * mean ** 3}
        if "_fast" not in state and "_cube" in state:
            state = {**state, "_fast": [state["_mean"], state["_sq"], state["_cube"]]}
        super().load_state_dict(state)
        self._published = self._scale_shift(self.mirrored) if self._samples else None
        self._served = self._applied = None

    def status(self) -> dict:
        return {"active": self._active, "features": self._ref_mean.numel(), "samples": self._samples,
                "mirrored": self.mirrored}


def _fold(moments: torch.Tensor, old: list[torch.Tensor], momentum: float) -> list[torch.Tensor]:
    """The per-sample EMA of (3, n, F) moments over the batch, in one step."""
    w, keep = ema_weights(moments.shape[1], momentum, moments)
    return [o * keep + v for o, v in zip(old, torch.einsum("n,knf->kf", w, moments))]


def _skew(mean: torch.Tensor, sq: torch.Tensor, cube: torch.Tensor) -> torch.Tensor:
    """Per-feature skewness from raw moments E x, E x^2, E x^3."""
    var = (sq - mean ** 2).clamp_min(MIN_VAR)
    return (cube - 3 * mean * sq + 2 * mean ** 3) / var ** 1.5
