"""The serving side: what every worker runs. Forward, label-free correction, monitoring, new versions.

Two threads may use a `ServingModel`, each owning what it writes:
- the serving thread calls `predict`: it runs the forward and queues the
  outputs, and it alone writes the model's tensors and hooks (`sync` copies
  in what the other thread prepared: adapted statistics, published weights,
  and registers or removes the correctors' hooks);
- a background thread (or the same thread, without `defer`) calls `drain`:
  monitoring and label-free correction on everything queued, in one
  vectorised pass, and `install`, which prepares a published version.
They meet only through the `PredictionQueue` (its own small lock, held to move
references) and reference swaps, so a forward never waits for the monitor.
Labelled learning is not here at all: a `Learner` (another process in a
server) publishes versions.

No client reaches what others are served except through guarded paths: an
input outside the reference's plausible range (`HealConfig.input_range`) or
one the model answers with NaN or inf is answered, counted and never
observed (monitor, estimate, label-free correction); adapted statistics that
go non-finite are reset at once (`LabelFreeCorrector`).
"""
from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selfheal_core.config import HealConfig
from selfheal_core.correct import LabelFreeCorrector, Observation
from selfheal_core.estimate import ATYPICAL_GATE, AccuracyEstimator
from selfheal_core.model_parts import FeatureTap, ModelParts, detached_copy, find_parts, pool_inputs
from selfheal_core.monitor import INPUT_SHIFT, LABEL_FREE, Monitor, ReferenceView
from selfheal_core.plausible import PlausibleRange
from selfheal_core.prediction_queue import PredictionQueue, nbytes
from selfheal_core.reference import ReferenceReport, check_reference
from selfheal_core.task import Task

log = logging.getLogger(__name__)

MIN_REFERENCE = 30  # the feature chart needs 30 vectors; fewer cannot calibrate a false-alarm rate
UNTRUSTED_SHARE = 0.01  # recent inputs outside the reference's range beyond this share: no estimate
TRUST_MARGIN = 0.02  # an estimate this far above the reference accuracy while the inputs shifted is not trusted
# An estimate this far above what the predicted classes allow (estimator.class_bound) while the inputs
# shifted and many are unlike the reference is not trusted (it is then discounted by the bound, an
# upper bound). The bound is shrunk for its own sampling noise; a changed class mix of typical inputs lowers
# it too, and is the traffic's, not the model's errors.
CLASS_SLACK = 0.15


def validate_reference(reference: Any) -> None:
    if not isinstance(reference, torch.Tensor) or reference.dim() < 2:
        raise ValueError("reference must be a tensor (R, ...) of held-out in-distribution inputs")
    if len(reference) < MIN_REFERENCE:
        raise ValueError(f"reference holds {len(reference)} inputs; selfheal needs at least {MIN_REFERENCE} (a few "
                         "hundred is better) held-out inputs to calibrate its detectors: build one with "
                         "`selfheal reference`")
    if reference.is_floating_point() and not torch.isfinite(reference).all():
        raise ValueError("reference contains NaN or inf")


@torch.no_grad()
def reference_outputs(model: nn.Module, reference: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The model's raw outputs on the reference, in batches (a large reference fits any memory)."""
    device = model_device(model)
    outs = [model(reference[i:i + batch].to(device)) for i in range(0, len(reference), batch)]
    return torch.cat(outs).cpu()


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        b = next(model.buffers(), None)
        return b.device if b is not None else torch.device("cpu")
    return p.device


def check_inputs(x: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 max_batch: int) -> torch.Tensor:
    """x as a validated (B, *shape) tensor of `dtype` on `device`; ValueError naming the problem."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"inputs must be a tensor, got {type(x).__name__}")
    if x.is_complex() or (x.dtype == torch.bool and dtype != torch.bool):
        raise ValueError(f"inputs must be numeric, got dtype {x.dtype}")
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"inputs must have shape (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError("empty batch")
    if len(x) > max_batch:
        raise ValueError(f"batch of {len(x)} exceeds the limit of {max_batch}")
    if not dtype.is_floating_point and x.is_floating_point():
        raise ValueError(f"inputs must be integers ({dtype}), got {x.dtype}")
    x = x.to(device, dtype)
    # A finite sum proves every element finite (NaN and inf propagate); only a sum that
    # overflowed from large finite values needs the elementwise check.
    if dtype.is_floating_point and not math.isfinite(float(x.sum())) and not torch.isfinite(x).all():
        raise ValueError("inputs contain NaN or inf")
    return x


@dataclass(frozen=True)
class Published:
    """A version made by a learner, as a worker installs it."""

    version: int
    weights: dict[str, torch.Tensor]  # parameter name -> value
    # the reference statistics fitted with these weights (`Learner.rebase_values`): {"detectors":
    # {name: reference_state}, "confidence": (R,), "predicted": (R,)}, installed as they are
    rebase: dict | None = None
    reference: ReferenceView | None = None  # or the reference view itself (format 4): fitted here


def rebase_values(monitor: Monitor, view: ReferenceView) -> dict:
    """What a worker installs so that a version's weights do not read as drift, fitted on the
    reference `view` through them: each detector's reference statistics (`monitor` calibrated on
    the same source view: the feature chart's axes are its) and the reference's confidences and
    predicted classes and features on the chart's axes (the accuracy estimate's calibration).
    Float32 / int16: a few KB."""
    out: dict = {"detectors": {name: {k: v.float() if v.is_floating_point() else v for k, v in values.items()}
                               for name, values in monitor.fit_rebase(view).items()}}
    if view.probs is not None:
        conf, pred = view.probs.max(1)
        out.update(confidence=conf.float(),
                   predicted=pred.to(torch.int16 if view.probs.shape[1] < 2 ** 15 else torch.int32))
        points = monitor.project_features(view.features)
        if points is not None:
            out["points"] = points.float()
    return out


def _equal(a: Any, b: Any) -> bool:
    """Tensors, dicts and dataclass views compared by value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, ReferenceView) and isinstance(b, ReferenceView):
        return _equal(a.__dict__, b.__dict__)
    return a is b or a == b


def _same_version(old: Published | None, new: Published) -> bool:
    """Whether `new` carries the weights and reference statistics `old` did (only its number differs)."""
    return old is not None and _equal(old.weights, new.weights) and _equal(old.rebase, new.rebase) \
        and _equal(old.reference, new.reference)


class ServingModel:
    """Serve `model`, watch its inputs and outputs, correct it without labels, install versions.

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    >>> serving = ServingModel(model, torch.randn(200, 4))
    >>> serving.predict(torch.randn(5, 4)).shape
    torch.Size([5, 3])
    >>> serving.status()["drift"]["detected"], serving.status()["label_free"]["available"]
    (False, 'input_polarity, norm_stats, prior')
    """

    def __init__(self, model: nn.Module, reference: torch.Tensor, config: HealConfig = HealConfig(),
                 task: str | Task = "classification", reference_targets: torch.Tensor | None = None,
                 calibration: dict | None = None) -> None:
        validate_reference(reference)
        self.config = config
        self.model = model.eval()
        self.device = model_device(model)
        self.input_shape = tuple(reference.shape[1:])
        self.input_dtype = reference.dtype
        raw = reference_outputs(model, reference)
        self.task = task if isinstance(task, Task) else Task.from_outputs(task, raw)
        if self.task.outputs != max(1, math.prod(raw.shape[1:])):
            raise ValueError(f"the model returns {tuple(raw.shape[1:])} per input, the task expects {self.task.outputs}")
        self.parts: ModelParts = find_parts(model, self.task.outputs)
        targets = self.task.check_targets(reference_targets, len(reference)) if reference_targets is not None else None
        self.reference_report: ReferenceReport = check_reference(self.task, raw, targets)
        self.mode = self._mode()
        self._source = {k: v.detach().clone() for k, v in model.named_parameters()}
        trainee = detached_copy(model) if (self.mode == "heal" and self.parts.affine_norms) else None
        self._tap: FeatureTap | None = None
        self.corrector: LabelFreeCorrector | None = None
        try:  # from here on hooks go onto the user's model: a failure removes them again
            if self.parts.head is not None:
                self._tap = FeatureTap(self.parts.head)
            view = self.view(reference, targets)
            self._targets = targets
            self.monitor = Monitor(config.monitor, self.task, LABEL_FREE).calibrate(view, calibration)
            if calibration and self.monitor.calibrated_from != "given thresholds":
                log.info("the calibration given does not fit this model, reference or settings: not used")
            self.estimator = AccuracyEstimator()
            if view.probs is not None:
                self._calibrate_estimator(*view.probs.max(1), self.monitor.project_features(view.features))
            if self.mode == "heal":
                self.corrector = LabelFreeCorrector(model, self.parts, self.task, view.probs, config.correct, trainee,
                                                    reference)
        except BaseException:
            self.close()
            raise
        self._version = 0  # the published version these weights come from (0: the source model)
        # predictions: served; shed: predictions dropped unobserved (queue full); implausible: inputs outside
        # the reference's range; nonfinite_outputs: answers with NaN or inf (neither is observed);
        # rebase_refused: a version's detector statistics fitted along other axes (not installed)
        self.counters = {"predictions": 0, "shed": 0, "drains": 0, "implausible": 0, "nonfinite_outputs": 0,
                         "rebase_refused": 0}
        self._range = (PlausibleRange(reference, config.input_range)
                       if reference.is_floating_point() and math.isfinite(config.input_range) else None)
        # (raw, features, inputs, keep) per forward, oldest first
        self._queue = PredictionQueue(config.max_queued, config.max_queued_bytes)
        # a version prepared by install(), applied by the serving thread: (version, whether its weights
        # are the ones served already)
        self._pending: tuple[Published, bool] | None = None
        self._installed: Published | None = None  # the last version install() took (its thread's)
        self._reset_pending = False
        self._untrusted: deque[tuple[int, int, int]] = deque()  # (samples, implausible, nonfinite) per drain
        self._window_counts: tuple[int, ...] = (0, 0, 0)  # their sums (drain thread writes, any thread reads)
        self._trust: str | None = None  # why the estimate cannot be trusted, worked out once per drain: every
        # response reads it (the estimate itself is a pass over the window)
        self._drift = self._drift_summary()

    def _calibrate_estimator(self, conf: torch.Tensor, pred: torch.Tensor, points: torch.Tensor | None) -> None:
        """ATC's threshold from the reference's confidences and classes through the current weights,
        and its features on the feature chart's axes (which inputs are unlike it)."""
        self.estimator.calibrate(conf, (pred == self._targets) if self._targets is not None else None, classes=pred,
                                 points=points)

    def _mode(self) -> str:
        if not self.config.adapt:
            return "monitor"
        if self.parts.scripted:
            log.warning("the model is TorchScript: it takes no hooks and no gradient steps, so it is served "
                        "monitor-only (drift detection and accuracy estimates, no correction)")
            return "monitor"
        return "heal"

    def close(self) -> None:
        """Remove every hook selfheal put on the user's model."""
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        if self.corrector is not None:
            for part in self.corrector.inputs:
                if hasattr(part, "remove"):
                    part.remove()
            norm = self.corrector.norm_stats()
            if norm is not None:
                norm.deactivate()
                norm.sync_hooks()

    # ------------------------------------------------------------------ reference view
    @torch.no_grad()
    def view(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> ReferenceView:
        """Probabilities / values, features and errors of inputs x through the current weights."""
        raws, feats = [], []
        for i in range(0, len(x), 256):
            xb = x[i:i + 256].to(self.device)
            raws.append(self.model(xb).cpu())
            feats.append(self._features(xb))
        raw = torch.cat(raws)
        features = None if any(f is None for f in feats) else torch.cat(feats).to("cpu", torch.float64)
        errors = self.task.errors(raw, targets) if targets is not None else None
        return ReferenceView(probs=self.task.probs(raw), features=features,
                             values=None if self.task.is_classifier else self.task.values(raw), errors=errors)

    def _features(self, x: torch.Tensor) -> torch.Tensor | None:
        """Features of the forward just run on x: the head's input, or the pooled inputs (as they
        are: converted to float64 on the CPU once per drain, not per request)."""
        if self._tap is not None:
            return self._tap.take()
        return pool_inputs(x) if x.is_floating_point() else None

    # ------------------------------------------------------------------ validation
    def check_input(self, x: Any) -> torch.Tensor:
        """Validated input tensor on the model's device; ValueError naming the problem."""
        return check_inputs(x, self.input_shape, self.input_dtype, self.device, self.config.max_batch)

    # ------------------------------------------------------------------ serving thread
    def predict(self, x: torch.Tensor, defer: bool = False, checked: bool = False) -> torch.Tensor:
        """Corrected outputs for x; observed (monitored, adapted on) afterwards.

        `defer`: leave the observation to a background thread calling `drain()`; else it runs
        here once `observe_every` samples are queued. `checked`: x already passed `check_input`.
        Rows outside the reference's plausible range are answered and never observed.
        """
        x = x.to(self.device) if checked else self.check_input(x)
        self.sync()
        keep = self._range.screen(x) if self._range is not None else None  # (B,) bool or None: all may
        # reach shared state
        norm = self.corrector.norm_stats() if self.corrector else None
        # inference_mode, cheaper than no_grad: what the forward leaves is only read later,
        # outside it, where results are normal tensors again.
        with torch.inference_mode():
            if norm is not None and norm.active:
                with norm.recording(keep):
                    raw = self.model(x)
            else:
                raw = self.model(x)
            out = self.corrector.adjust(raw) if self.corrector else raw
        feats = self._features(x)
        keep_inputs = self.corrector is not None and self.corrector.needs_inputs and any(
            p.active for p in self.corrector.inputs if p.needs_inputs)
        inputs = x if keep_inputs else None
        shed = self._queue.put((raw, feats, inputs, keep), len(x), nbytes(raw, feats, inputs))
        self.counters["shed"] += shed
        self.counters["predictions"] += len(x)
        if keep is not None:
            self.counters["implausible"] += int((~keep).sum())
        if not defer and self._queue.samples >= self.config.observe_every:
            self.drain()
            self.sync()
        return out.clone()  # a normal tensor: callers may use it in autograd (e.g. as a teacher)

    def sync(self) -> None:
        """Serving thread: copy prepared values into the model (a published version, adapted
        statistics) and put on or take off the correctors' hooks. `predict` calls it first; an
        idle replica calls it to serve a newly installed version at once."""
        if self._reset_pending:
            self._reset_pending = False
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    p.copy_(self._source[name])
            if self.corrector is not None:
                self.corrector.rebase(self._source)
        pending, self._pending = self._pending, None
        if pending is not None:
            published, same = pending
            if not same:
                # a version carries the weights that differ from the source: the rest are the source's
                weights = {name: published.weights.get(name, self._source[name]) for name in self._source}
                with torch.no_grad():
                    for name, p in self.model.named_parameters():
                        p.copy_(weights[name])
                if self.corrector is not None:
                    self.corrector.rebase(weights)
            self._version = published.version
        if self.corrector is not None:
            self.corrector.apply()

    # ------------------------------------------------------------------ background thread
    def drain(self) -> int:
        """Monitor and adapt on everything queued; returns the samples drained (observed or not)."""
        items = self._queue.take_all()
        if not items:
            return 0
        with torch.no_grad():
            raw = torch.cat([r for r, _, _, _ in items]).cpu()
            n = len(raw)
            feats = [f for _, f, _, _ in items]
            features = torch.cat(feats).to("cpu", torch.float64) if all(f is not None for f in feats) else None
            inputs = [i for _, _, i, _ in items]
            inputs_all = torch.cat(inputs) if all(i is not None for i in inputs) else None
            keeps = [k for _, _, _, k in items]  # None: every row of that batch was plausible
            plausible = torch.ones(n, dtype=torch.bool) if all(k is None for k in keeps) else torch.cat(
                [torch.ones(len(item[0]), dtype=torch.bool) if k is None else k.cpu() for item, k in zip(items, keeps)])
            finite = torch.isfinite(raw.reshape(n, -1)).all(1)
            if features is not None:
                finite &= torch.isfinite(features).all(1)
            self.counters["nonfinite_outputs"] += int((~finite).sum())
            self._note_untrusted(n, int((~plausible).sum()), int((plausible & ~finite).sum()))
            use = plausible & finite
            if not bool(use.all()):  # answered, never observed: nothing of it reaches shared state
                raw = raw[use]
                features = features[use] if features is not None else None
                inputs_all = inputs_all[use.to(inputs_all.device)] if inputs_all is not None else None
            if len(raw):
                self._observe(raw, features, inputs_all)
        self.counters["drains"] += 1
        self._drift = self._drift_summary()
        self._trust = self._untrusted_because()
        return n

    def _observe(self, raw: torch.Tensor, features: torch.Tensor | None, inputs: torch.Tensor | None) -> None:
        probs = self.task.probs(raw)
        values = None if self.task.is_classifier else self.task.values(raw)
        fired = self.monitor.observe_predictions(probs, features, values)
        if probs is not None:
            conf, classes = probs.max(1)
            self.estimator.observe(conf, classes, self.monitor.project_features(features))
        if self.corrector is not None:
            obs = Observation(raw=raw, probs=probs, features=features, fired=fired, inputs=inputs)
            started = self.corrector.observe(obs)
            if started:
                log.info("%s drift after %d predictions: started %s", "+".join(fired),
                         self.counters["predictions"], ", ".join(started))

    def _note_untrusted(self, n: int, implausible: int, nonfinite: int) -> None:
        """Drain thread: the counts of the last `estimator.window` samples that no estimate can
        speak for, summed into one immutable tuple that any thread may read."""
        self._untrusted.append((n, implausible, nonfinite))
        while len(self._untrusted) > 1 and sum(c[0] for c in self._untrusted) - self._untrusted[0][0] \
                >= self.estimator.window:
            self._untrusted.popleft()
        self._window_counts = tuple(sum(c[k] for c in self._untrusted) for k in range(3))

    def estimate_trust(self) -> str | None:
        """Why the live accuracy estimate cannot be trusted now (None: it can), as of the last drain."""
        return self._trust

    def _untrusted_because(self) -> str | None:
        """Why the live accuracy estimate cannot be trusted (None: it can). Confidence-based
        estimates are blind where the model answers inputs unlike anything it was calibrated on:
        inputs outside the reference's range, NaN answers, a shift of the inputs after which the
        model is surer than on the reference (a dead sensor channel read 1.000 at 28% accuracy), or
        after which its predicted classes moved too far for the estimate to be right."""
        total, implausible, nonfinite = self._window_counts
        if nonfinite:
            return "the model answered NaN or inf on recent inputs"
        if implausible > UNTRUSTED_SHARE * total:
            return "recent inputs lie outside the reference's range"
        if not set(self._drift["firing"]) & {n.value for n in INPUT_SHIFT}:
            return None  # the checks below are passes over the estimate window: only after a shift
        atc, ref = self.estimator.atc, self.estimator.reference_accuracy
        if atc is None:
            return None
        if ref is not None and atc > ref + TRUST_MARGIN:
            return "inputs shifted and the model is surer than on its reference: confidence cannot see its errors"
        bound, share, value = self.estimator.class_bound(), self.estimator.atypical_share(), self.estimator.uncapped
        # typical inputs in another class mix are the traffic's label shift: the estimate holds there
        if bound is not None and value > bound + CLASS_SLACK and (share is None or share >= ATYPICAL_GATE):
            unlike = "" if share is None else f", {share:.0%} of them unlike the reference,"
            return (f"inputs shifted{unlike} and the predicted classes moved more than an accuracy of {value:.2f} "
                    f"allows (at most {bound:.2f} if the classes sent did not change): the model errs where it is "
                    f"sure, and the estimate is discounted by that upper bound")
        return None

    def check_published(self, published: Published) -> None:
        """ValueError naming the first weight a version has that this model cannot take (another
        architecture's snapshot directory): it is then skipped, not installed and crashed on."""
        params = dict(self.model.named_parameters())
        for name, value in published.weights.items():
            if name not in params:
                raise ValueError(f"version {published.version} has weight {name!r}, which this model does not")
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(params[name].shape):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"version {published.version}: weight {name!r} is {shape}, this model's is "
                                 f"{tuple(params[name].shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"version {published.version}: weight {name!r} is not finite")
        if published.rebase is not None:
            self._check_rebase(published)

    def _check_rebase(self, published: Published) -> None:
        """ValueError naming what in a version's reference statistics this model cannot take."""
        rebase, v = published.rebase, published.version
        if not isinstance(rebase, dict) or not isinstance(rebase.get("detectors", {}), dict):
            raise ValueError(f"version {v}: its reference statistics are not a mapping")
        if "confidence" in rebase:
            conf, pred = rebase.get("confidence"), rebase.get("predicted")
            n = len(self._targets) if self._targets is not None else None
            if not (isinstance(conf, torch.Tensor) and isinstance(pred, torch.Tensor) and conf.dim() == pred.dim() == 1
                    and len(conf) == len(pred) and (n is None or len(conf) == n)):
                raise ValueError(f"version {v}: its reference confidences do not fit this model's reference")
            if not bool(torch.isfinite(conf).all()) or pred.is_floating_point():
                raise ValueError(f"version {v}: its reference confidences are not finite or its classes not whole")
            points = rebase.get("points")
            if points is not None and not (isinstance(points, torch.Tensor) and points.dim() == 2
                                           and len(points) == len(conf) and points.is_floating_point()
                                           and bool(torch.isfinite(points).all())):
                raise ValueError(f"version {v}: its reference points are not one finite row per reference input")

    def install(self, published: Published) -> None:
        """Prepare a published version: the monitor re-reads its reference now, the weights are
        copied in by the serving thread before its next forward. ValueError (nothing changed) for a
        version this model cannot take."""
        self.check_published(published)
        # a learner publishes a version after labels were absorbed even where its update was rolled
        # back (most are): weights and reference as installed already, nothing to re-read ...
        same = _same_version(self._installed, published)
        if not same and (published.rebase is not None or published.reference is not None):
            # a format-4 version carries the view itself: its statistics are fitted here
            self._install_rebase(published.version, published.rebase if published.rebase is not None
                                 else rebase_values(self.monitor, published.reference))
            self._trust = self._untrusted_because()  # against the new reference accuracy
        # ... or to copy, unless the version before it still waits for the serving thread
        waiting = self._pending
        same = same and (waiting is None or waiting[1])
        self._installed = published
        self._pending = (published, same)

    def _install_rebase(self, version: int, rebase: dict) -> None:
        """A version's reference statistics (`rebase_values`, checked by `check_published`). A
        detector whose values were fitted along other axes than its own keeps its reference and
        says so: the version's weights are served all the same."""
        values = rebase.get("detectors") or {}
        try:
            self.monitor.install_rebase(values)
        except ValueError:
            for name, state in values.items():
                try:
                    self.monitor.install_rebase({name: state})
                except ValueError as exc:
                    self.counters["rebase_refused"] += 1
                    log.warning("version %d: %s keeps its reference statistics: %s", version, name, exc)
        if "confidence" in rebase:  # a version without points (an older learner's): no atypical check
            self._calibrate_estimator(rebase["confidence"].double(), rebase["predicted"].long(), rebase.get("points"))

    def reset(self) -> None:
        """Back to the source weights; forget adaptation and drift state (weights at the next forward)."""
        self._queue.clear()
        self._untrusted.clear()
        self._window_counts = (0, 0, 0)
        self._trust = None
        self._pending = self._installed = None
        self._reset_pending = True
        if self.corrector is not None:
            self.corrector.reset()
        self.monitor.reset()
        self._version = 0
        self._drift = self._drift_summary()

    # ------------------------------------------------------------------ what others read
    def _drift_summary(self) -> dict:
        state = self.monitor.state
        return {"detected": state.detected, "firing": state.firing, "scores": state.scores}

    @property
    def version(self) -> int:
        """The published version the served weights come from (0: the source model)."""
        return self._version

    def published_as(self, version: int) -> None:
        """The weights served now were just saved as `version` (one process: `SelfHealer`)."""
        self._version = int(version)

    @property
    def pending_version(self) -> int:
        """The version served after the next forward: installed but maybe not yet applied."""
        pending = self._pending
        return pending[0].version if pending is not None else self._version

    @property
    def queued(self) -> int:
        """Samples served and not yet drained (any thread: a read of the queue's total)."""
        return self._queue.samples

    @property
    def drift(self) -> dict:
        """The drift state after the last drain (an immutable snapshot: safe from any thread)."""
        return self._drift

    def context(self) -> dict:
        """What the learner needs to know of serving: adapted statistics, the input transform, and
        whether inputs drifted."""
        norm = self.corrector.norm_stats() if self.corrector else None
        inputs = self.corrector.input_stats() if self.corrector else None
        return {"norm": norm.moments() if norm is not None else None,
                "input": inputs.transform() if inputs is not None else None,
                "inputs_drifted": bool(set(self._drift["firing"]) & {n.value for n in INPUT_SHIFT}),
                "drift": self._drift}

    def status(self) -> dict:
        return {
            "version": self.version,
            "task": self.task.kind.value,
            "mode": self.mode,
            "drift": self.monitor.state.as_dict(),
            "monitor": {"missing": dict(self.monitor.missing), "calibrated_from": self.monitor.calibrated_from},
            "label_free": (self.corrector.status() if self.corrector
                           else {"available": "off: monitor-only mode"}),
            "model": self.parts.describe(),
            "reference": self.reference_report.as_dict(),
            "accuracy": (dict(self.estimator.status(), trusted=self._trust is None,
                              untrusted_reason=self._trust) if self.task.is_classifier else None),
            "counters": dict(self.counters),
            "queue": {"samples": self._queue.samples, "bytes": self._queue.bytes,
                      "max_bytes": self._queue.max_bytes, "shed_bytes": self._queue.shed_bytes},
        }

    def state_dict(self) -> dict:
        """The serving state (monitor and corrector), for resuming exactly in one process."""
        return {"monitor": self.monitor.state_dict(),
                "corrector": self.corrector.state_dict() if self.corrector else None,
                "estimator": self.estimator.state_dict(), "counters": dict(self.counters)}

    def load_state_dict(self, state: dict) -> None:
        self.monitor.load_state_dict(state["monitor"])
        if self.corrector is not None and state.get("corrector") is not None:
            self.corrector.load_state_dict(state["corrector"])
        if state.get("estimator") is not None:
            self.estimator.load_state_dict(state["estimator"])
        self.counters.update(state.get("counters", {}))
        self._drift = self._drift_summary()
        self._trust = self._untrusted_because()
