"""Typed, frozen configuration for every part of selfheal_core.

Defaults are chosen for small models served one request at a time; each
field says why it has its value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Mapping

ParamSet = Literal["auto", "all", "last_layer", "norm_and_last"]
ConceptPolicy = Literal["hold", "learn"]


def _typed(obj: Any, allow_inf: tuple[str, ...] = ()) -> None:
    """Every int, float and bool field holds a value of its type (a YAML "abc" or a bool where a
    number belongs is named, not a TypeError later); floats are finite unless listed in allow_inf."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        where = f"{type(obj).__name__}.{f.name}"
        if f.type == "bool" and not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        if f.type == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where} must be a number, got {value!r}")
            if math.isnan(value) or (math.isinf(value) and f.name not in allow_inf):
                raise ValueError(f"{where} must be a finite number, got {value!r}")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) > 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be > 0, got {getattr(obj, name)!r}")


def _unit(obj: Any, *names: str) -> None:
    for name in names:
        if not 0.0 <= getattr(obj, name) <= 1.0:
            raise ValueError(f"{type(obj).__name__}.{name} must be in [0, 1], got {getattr(obj, name)!r}")


def _choice(obj: Any, name: str, valid: tuple) -> None:
    if getattr(obj, name) not in valid:
        raise ValueError(f"{type(obj).__name__}.{name} must be one of {', '.join(map(str, valid))}, "
                         f"got {getattr(obj, name)!r}")


@dataclass(frozen=True)
class MonitorConfig:
    expected_run_time: int = 10_000  # clean samples between false alarms, per detector (ERT); the
    # monitor's drift flag has three label-free detectors, so it false-alarms ~3x as often
    cusum_slack: float = 0.5  # CUSUM allowance k, in standard-normal units of the rank scores
    ewma_lambda: float = 0.05  # MEWMA weight of the newest sample: memory of ~20-40 samples
    feature_dims: int = 8  # principal directions of the penultimate features watched
    calibration_margin: float = 0.6  # MEWMA charts: calibrate as if the reference were this fraction of its size
    settle_samples: int = 1_000  # quiet samples after the last alarm before drift is cleared
    error_rate_floor: float = 0.02  # reference error is optimistic (few samples): floor it
    error_rate_shift: float = 0.10  # error-rate increase the error detector is tuned for
    calibration_paths: int = 200  # bootstrap CUSUM paths used to set thresholds
    seed: int = 0  # calibration is seeded so a restart gets the same thresholds

    def __post_init__(self) -> None:
        _typed(self)
        _positive(self, "expected_run_time", "cusum_slack", "settle_samples", "error_rate_shift",
                  "calibration_paths", "ewma_lambda", "feature_dims", "calibration_margin")
        _unit(self, "error_rate_floor", "ewma_lambda", "calibration_margin")
        if self.expected_run_time < 10:
            raise ValueError(f"MonitorConfig.expected_run_time must be >= 10, got {self.expected_run_time}")


@dataclass(frozen=True)
class CorrectConfig:
    norm_stats: bool = True  # adapt BatchNorm running statistics to live inputs
    input_stats: bool = True  # models without BatchNorm, float inputs: align input moments with the reference
    input_polarity: bool = True  # float inputs: undo a mirrored input (skewness signs flipped; an image
    # negative), for BatchNorm models too (bench_heal invert at severity 5: CNN 0.994 -> 0.044 error,
    # LayerNorm MLP 0.998 -> 0.053, in the continual stream)
    norm_affine: bool = True  # models with LayerNorm/GroupNorm: entropy-train their affine parameters
    entropy: bool = False  # entropy minimisation of a feature adapter before the last Linear: off by
    # default, as it gained nothing over the statistics on Digits-C (continual 0.4744 vs 0.4742 at batch
    # 64, 0.4707 vs 0.4706 at 1) and cost 1.8 points in the worst 1k window of the long stream
    prior: bool = True  # Bayesian class-prior correction of the logits (label shift)
    when: Literal["drift", "always"] = "drift"  # start at the first matching drift alarm, or at once
    momentum: float = 0.01  # norm stats: per-sample EMA weight, memory ~100 samples, works at batch 1
    input_momentum: float = 0.003  # input stats: per-sample EMA weight, memory ~330 samples (class runs
    # of a correlated stream are not mistaken for shift; ~100 measured 11 points worse there)
    noise_se: float = 4.0  # norm and input stats: a live moment within about this many of its own
    # standard errors of the source's is estimation noise and is pulled back to it (0: adopt as is).
    # Measured: 3 left label-free 1e-4 below static on two tabular streams; 4 none, and cost the
    # LayerNorm MLP 0.7 points on continual Digits-C (0.449 -> 0.455; source 0.701), the CNN nothing
    affine_lr: float = 1e-3  # norm affine: Adam step size (TENT's)
    entropy_lr: float = 0.01  # feature adapter: SGD step size
    entropy_step_every: int = 64  # samples (across requests) per adapter step
    entropy_margin: float = 0.4  # reliable samples: entropy below this fraction of log(C) (EATA)
    entropy_anchor: float = 1.0  # L2 pull of the adapted values towards the source
    entropy_decay: float = 0.01  # share of the adaptation removed at each step: returns to source when idle
    prior_momentum: float = 0.01  # class-prior EM: per-sample weight, memory ~100 samples
    prior_quiet: int = 1_000  # prior correction only this many predictions after a confidence alarm
    collapse_share: float = 0.9  # reset adaptation when one class takes this share of recent predictions
    collapse_window: int = 500  # predictions in that share's memory

    def __post_init__(self) -> None:
        _typed(self)
        _choice(self, "when", ("drift", "always"))
        _unit(self, "momentum", "input_momentum", "entropy_margin", "prior_momentum", "collapse_share")
        _positive(self, "affine_lr", "entropy_lr", "entropy_step_every", "collapse_window", "prior_quiet",
                  "momentum", "input_momentum", "entropy_margin")
        if not 0 <= self.entropy_decay < 1:
            raise ValueError(f"CorrectConfig.entropy_decay must be in [0, 1), got {self.entropy_decay}")
        if self.entropy_anchor < 0:
            raise ValueError(f"CorrectConfig.entropy_anchor must be >= 0, got {self.entropy_anchor}")
        if not 0 <= self.noise_se < float("inf"):
            raise ValueError(f"CorrectConfig.noise_se must be a finite number >= 0, got {self.noise_se}")


@dataclass(frozen=True)
class LearnConfig:
    params: ParamSet = "auto"  # auto: every weight of a small model (<= auto_max_params), else norm affine +
    # last Linear. Measured on the digits CNN with 100 rotated labels: all weights 0.81 accuracy, norm+last 0.47
    auto_max_params: int = 200_000
    lr: float = 1e-3  # Adam step size when every weight trains (small models)
    partial_lr: float = 1e-4  # ... when a part trains (norm affine + last layer): each of those parameters
    # scales a whole channel or class, and 1e-3 moved a ResNet-20's clean recall of one class by up to 80
    # points an update, so the guard refused nearly all (Fashion-MNIST-C, 5% labels, BatchNorm: 33 of 36
    # rolled back, 0.441 of the gap to the oracle closed; 1e-4: 4 of 36, 0.447; GroupNorm: 38 of 38,
    # error 0.629; 1e-4: 3 of 38, 0.565)
    steps: int = 20  # gradient steps per update
    batch_size: int = 32  # replay minibatch
    min_steps: int = 20  # steps shrink as labels per update grow (steps * update_every / labels, at least
    # this), each longer by steps / those: rare labels used more, plentiful ones at bounded compute and
    # about the same distance moved per update. bench_tabular and bench_feedback set 5;
    # the default keeps `steps` until the serving paths (demo, attack, estimate, byom) are re-measured with it
    update_every: int = 2  # new training labels between updates (rotated digits, 1% feedback: 2 and 20
    # steps close 45% of the gap to the oracle, 4 and 10 steps 33%)
    max_labels_per_update: int = 64  # a learner that fell behind folds at most this many new labels into
    # one update, so the delay from a label to published weights stays bounded under any label rate
    recent_size: int = 256  # newest labels kept verbatim
    reservoir_size: int = 256  # uniform sample of older labels (anti-forgetting)
    replay_bytes: int = 128 * 2 ** 20  # both together hold at most this many bytes of inputs: fewer pairs
    # of a large input (512 3x224x224 images are 308 MB), in the same recent / reservoir proportion
    step_bytes: int = 64 * 2 ** 20  # activations one training forward may hold: a minibatch of large inputs
    # runs in chunks with gradients accumulated (the same step). A 224x224 ResNet-18's learner: 2 images
    # a chunk, its update's peak 51 MB below 128 MiB's for the same CPU (161 s against 166 s)
    reference_fraction: float = 0.25  # share of each minibatch from labelled reference data
    newest_fraction: float = 0.25  # share of each minibatch from the newest `newest_window` labels: the
    # current domain's few labels are a small minority of the replay memory right after a shift (the
    # demo's rotate-4 phase with 10% labels, in one process: 0.594 without, 0.621 with 0.25, 0.630 with 0.5)
    newest_window: int = 32
    anchor: float = 1e-2  # L2 pull towards the source weights
    bayes: bool = True  # Bayesian (Kalman) update of the last layer on every training label
    bayes_prior_var: float = 0.01  # prior variance of the last layer's weights (per feature unit)
    bayes_forgetting: float = 0.995  # per-label decay of old evidence: tracks drift (memory ~200 labels)
    # A label answering a prediction older than `past_age_s` is learned only if its inputs look like
    # the traffic served now (the newest `past_sample` predictions): labels days late about a domain
    # the traffic has left would undo adaptation to the current one. Tested per run of up to 64 labels
    # of neighbouring prediction times, at level `past_alpha` (0: learn every label, however old).
    past_age_s: float = 3_600.0
    past_sample: int = 256
    past_alpha: float = 0.01

    def __post_init__(self) -> None:
        _typed(self)
        _choice(self, "params", ("auto", "all", "last_layer", "norm_and_last"))
        _positive(self, "past_age_s", "past_sample")
        if not 0 <= self.past_alpha < 1:
            raise ValueError(f"LearnConfig.past_alpha must be in [0, 1), got {self.past_alpha}")
        _positive(self, "lr", "partial_lr", "steps", "min_steps", "batch_size", "update_every", "recent_size", "reservoir_size",
                  "replay_bytes", "step_bytes", "auto_max_params", "bayes_prior_var", "max_labels_per_update")
        if not 0 < self.bayes_forgetting <= 1:
            raise ValueError(f"LearnConfig.bayes_forgetting must be in (0, 1], got {self.bayes_forgetting}")
        _unit(self, "reference_fraction", "newest_fraction")
        if self.reference_fraction + self.newest_fraction > 1:
            raise ValueError("LearnConfig.reference_fraction + newest_fraction must be <= 1")
        _positive(self, "newest_window")
        if self.anchor < 0:
            raise ValueError(f"LearnConfig.anchor must be >= 0, got {self.anchor}")


@dataclass(frozen=True)
class GuardConfig:
    holdout_every: int = 5  # every k-th label is held back to validate updates, never trained on
    holdout_size: int = 20  # newest held-back labels: small, so validation follows the current domain
    min_holdout: int = 3  # no update until this many labels are held back (0: learn unvalidated)
    tolerance: float = 0.0  # accepted rise in held-back loss beyond the noise allowance below
    significance: float = 0.0  # ... plus this many standard errors of the paired per-label change. 0: the
    # loss must not rise at all, which rolls back ~75% of honest updates on ~20 held-back labels; 1.0 cut
    # that to ~30% in bench_tabular (which sets it), but each accepted update then costs a reference refit
    # and a publish, and feedback-heavy paths slowed several-fold: the default stays 0 until that is cheaper
    quarantine: bool = True  # hold back bursts of labels that look like poisoning (see quarantine.py)
    quarantine_window: int = 200  # recent labels the burst test looks at
    quarantine_confidence: float = 0.8  # a disagreement counts when the model was at least this sure
    quarantine_min_count: int = 5  # confident disagreements into one class before it can be quarantined
    # (0.9 and 8 let ~20 poisoned labels through before the quarantine closed: +1.9 points on the
    # adversarial stream; 0.8 and 5: +0.2)
    quarantine_share: float = 0.5  # ... and at least this share of all recent confident disagreements
    quarantine_min_sources: int = 3  # ... coming from at least this many predicted classes
    corroborate: int = 3  # a confident disagreement is learned once its (served, given) pair repeats this often
    overrepresented: float = 2.0  # a broken labeller: a given class at this multiple of its reference share
    # (and at least 15 points above it) with disagreements from quarantine_min_sources classes: its
    # disagreeing labels are quarantined whatever the model's confidence (drift makes it unsure)
    pair_max_rate: int = 40  # bounded influence: at most this many labels of one (served, given) pair with
    pair_rate_window: int = 200  # served != given learned per this many labels; the rest is held
    concept_change: ConceptPolicy = "hold"  # labels contradicting the trusted reference: hold them until an
    # operator approves (or inputs drifted), or learn them after a corroboration window at bounded speed
    concept_min_count: int = 5  # contradictions of one (reference, given) pair before it is reported
    concept_corroborate: int = 5  # policy learn: contradictions of one pair before they are learned ...
    concept_consistency: float = 0.5  # ... once one of them is what this share of the 2 x corroborate recent
    # labels nearest it say (20 contradictions and no local test: a swapped digit waited ~200 labels at 5%
    # feedback, and label noise accumulated towards it over a long stream)
    concept_max_share: float = 1.0  # policy learn: a pair's labels learned per window are at most this
    concept_rate_window: int = 200  # multiple of what its reference class brings in as many labels (its
    # reference share x window: 20 of 200 for a tenth); 10 of 200 flat held half of a swapped digit's
    # honest labels (bench_feedback concept stream)
    concept_hold_max: int = 2_000  # held labels kept for an approval (older ones stay in the log only) ...
    concept_hold_bytes: int = 128 * 2 ** 20  # ... and the bytes of their inputs (2,000 224x224 images: 1.2 GB)
    reference_check_drop: float = 0.10  # an update that lowers any class's recall on the labelled reference
    # by more than this is rolled back (the reference is trusted; approved concept changes relabel it)
    source_window: int = 32  # labels over which the learned weights are compared with the source weights,
    # each label before it is learned (0: off); worse by source_significance standard errors of the paired
    # loss difference, the learned weights go back to the source ones (source_check.py)
    source_significance: float = 3.0
    source_min_labels: int = 8  # ... once the window holds at least this many labels

    def __post_init__(self) -> None:
        _typed(self)
        _positive(self, "holdout_every", "holdout_size", "quarantine_window", "quarantine_min_count",
                  "quarantine_min_sources", "corroborate", "overrepresented", "pair_max_rate", "pair_rate_window",
                  "concept_min_count", "concept_corroborate", "concept_max_share", "concept_rate_window",
                  "concept_hold_max", "concept_hold_bytes")
        _unit(self, "quarantine_confidence", "quarantine_share", "reference_check_drop", "concept_consistency")
        _choice(self, "concept_change", ("hold", "learn"))
        if self.min_holdout < 0 or self.tolerance < 0 or self.significance < 0:
            raise ValueError("GuardConfig.min_holdout, tolerance and significance must be >= 0")
        if self.source_window < 0 or self.source_significance < 0 or self.source_min_labels < 1:
            raise ValueError("GuardConfig.source_window and source_significance must be >= 0, "
                             "source_min_labels >= 1")
        if self.source_window and self.source_min_labels > self.source_window:
            raise ValueError(f"GuardConfig.source_min_labels ({self.source_min_labels}) must be <= "
                             f"GuardConfig.source_window ({self.source_window}): the check could never decide")
        if self.min_holdout > self.holdout_size:
            raise ValueError(f"GuardConfig.min_holdout ({self.min_holdout}) must be <= GuardConfig.holdout_size "
                             f"({self.holdout_size}): no update could ever be validated")


@dataclass(frozen=True)
class HealConfig:
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    correct: CorrectConfig = field(default_factory=CorrectConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    adapt: bool = True  # False: monitor only (no label-free correction, labels logged and watched, not learned)
    max_batch: int = 1_024  # larger inputs are refused: bounded work per call
    snapshot_interval_s: float = 1.0  # at most one published version per interval (rate limit)
    max_queued: int = 8_192  # predictions awaiting drain(); beyond this the oldest are shed
    max_queued_bytes: int = 256 * 2 ** 20  # ... and the bytes they hold (outputs, features, inputs kept for
    # input adaptation): a 3x224x224 input is 600 kB, so 8,192 of them would be 4.9 GB per worker
    input_range: float = 3.0  # inputs with a feature beyond this multiple of its reference range past either
    # end of that range are answered but never adapted on, monitored or learned from: one request of pixels
    # at 1e18 once turned the shared BatchNorm statistics into inf (issue 26, case A); gain x1.6, contrast,
    # brightness and noise corruptions all stay well within 3 (inf: no check)
    observe_every: int = 128  # predict() without defer (a server's background thread: also after its
    # drain_interval_s) monitors and adapts once this many samples are
    # queued: one vectorised pass instead of one per request (a detector or statistics update has a
    # fixed cost of ~1 ms); adaptation lags by at most this many samples (Digits-C continual, batch 64:
    # 64 -> error 0.474 and 2.0x a plain forward, 128 -> 0.480 and 1.8x, 256 -> 0.488)

    def __post_init__(self) -> None:
        _typed(self, allow_inf=("input_range",))
        _positive(self, "max_batch", "max_queued", "observe_every", "max_queued_bytes", "input_range")
        if self.observe_every > self.max_queued:
            raise ValueError(f"HealConfig.observe_every ({self.observe_every}) must be <= HealConfig.max_queued "
                             f"({self.max_queued}): predictions are shed before they are ever observed")
        if self.snapshot_interval_s < 0:
            raise ValueError(f"HealConfig.snapshot_interval_s must be >= 0, got {self.snapshot_interval_s}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "HealConfig":
        """Build from a nested mapping (e.g. a YAML section); unknown keys are an error."""
        data = dict(data or {})
        parts = {"monitor": MonitorConfig, "correct": CorrectConfig, "learn": LearnConfig, "guard": GuardConfig}
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name in parts:
                kwargs[name] = _build(parts[name], value)
            elif name in {f.name for f in fields(cls)}:
                kwargs[name] = value
            else:
                raise ValueError(f"unknown HealConfig key {name!r}; valid: {sorted(f.name for f in fields(cls))}")
        return cls(**kwargs)


def _build(kind: type, value: Mapping[str, Any] | None) -> Any:
    if value is not None and not isinstance(value, Mapping):
        raise ValueError(f"{kind.__name__} settings must be a mapping, got {type(value).__name__}")
    valid = {f.name for f in fields(kind)}
    unknown = set(value or {}) - valid
    if unknown:
        raise ValueError(f"unknown {kind.__name__} keys {sorted(unknown)}; valid: {sorted(valid)}")
    return kind(**dict(value or {}))
