"""Live accuracy without labels: Average Thresholded Confidence (Garg et al., ICLR 2022).

On the labelled reference, find the confidence threshold t above which the
share of predictions equals the reference accuracy. Live, the share of recent
predictions above t estimates the accuracy on the current distribution
(confidence falls as inputs drift; the threshold turns that fall into an
accuracy, where the plain average confidence stays over-confident). The
score is the top-class probability, which is also what the prediction record
keeps, so labelled feedback can check the estimate on the very predictions it
labels: `LabelledAccuracy` (on the learning side) measures the observed
accuracy of labelled predictions and ATC's own estimate for them, and the
serving side adds their difference, shrunk by the number of labels, to its
estimate (`corrected`).

ATC counts every prediction above its threshold as right. Where the reference
itself is wrong at high confidence (an over-confident tabular model: right 84%
of the time above NannyML's California housing threshold) a window of sure
predictions reads near 1.0. The reference's calibration map (isotonic, as
NannyML's CBPE fits it) says how often predictions that sure were right; the
estimate is the lower of ATC and the window's mean calibrated confidence. Both
are over-confident under shift more often than not, and the lower of the two
was never the worse on the streams measured while developing: California
housing 7.3 -> 5.1 points (CBPE 5.3), digits and held-out streams (a LayerNorm
MLP on digits at other severities, NOAA rainfall) 0.0-0.3 points better.

Confidence cannot see errors on inputs unlike anything the model was calibrated
on: Fashion-MNIST-C's fog or contrast send a ResNet to one class for 90% of the
images at 0.96 confidence, 10% right. Two cross-checks need no labels. Each
input's features (projected onto the feature chart's axes) are compared with
the reference's: an input farther from its nearest reference points than 99% of
the reference's own is atypical. And the predicted classes bound the accuracy:
if the classes sent are in the reference's proportions, a model predicting one
class for everything is right at most as often as that class comes
(`class_bound`). Where many recent inputs are atypical, confidence and the class
mix are taken as independent witnesses of the errors: a prediction is right only
where both allow it, so the estimate is the confidence-based one times the class
bound. Where the inputs are typical a moved class mix is the traffic's (label
shift), not the model's errors, and the confidence-based estimate stands.

Capping at the bound instead (the lower of the two, as until 1612cc6) assumes
the two see the same errors. They mostly do not: after BatchNorm statistics
adapt, a ResNet on noisy or snowy images is 37-49% right, says 64-69%, and its
classes allow 72-77%, so the cap never bound. The bound is read relative to its
no-shift reading (`_null_bound`): its noise shrinkage leaves unshifted traffic
at 0.96-0.97 on ten classes, and those few points are not errors. Measured while
developing (windows of 500, static and with label-free correction): the
BatchNorm ResNet-20 on Fashion-MNIST-C at severities 3 and 5 (the benchmark's
images) 8.1 -> 4.8 and 10.1 -> 5.2 points; the digits corruptions at severities
1, 3 and 5 (other draws than the benchmark's) 10.3 -> 8.8 and 9.5 -> 7.2; held
out of that choice, the GroupNorm ResNet-20 at severities 2 and 4 11.4 -> 4.9 and
11.8 -> 6.8 (no stream worse by more than 2.3). It reads low where atypical inputs are still mostly
right and the classes moved a little for other reasons (digits contrast-5, 34%
right: 0.36 -> 0.14; contrast-3, 94%: 0.89 -> 0.84). On clean inputs in
Dirichlet class order (label shift) the inputs are typical and nothing changes.
"""
from __future__ import annotations

from collections import deque

import torch

from selfheal_core.state import DequeState, StateMixin

PRIOR_LABELS = 50  # labels before the observed difference counts as much as ATC itself
NEIGHBOURS = 5  # an input's distance to the reference: the mean over its nearest reference points
TYPICAL_QUANTILE = 0.99  # the reference's own inputs farther than the radius: 1%
# the share of a window beyond the radius from which the class bound caps the estimate: a share
# of 0.05 to 0.20 gave the same error within 0.4 points on the shifts measured (1% on the reference)
ATYPICAL_GATE = 0.10


class AccuracyEstimator(StateMixin):
    """ATC (or the calibrated confidence, the lower) over a window of recent predictions; without
    reference labels, the average confidence.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> conf = torch.rand(400, generator=g) * 0.5 + 0.5
    >>> correct = torch.rand(400, generator=g) < conf  # calibrated: right as often as it is sure
    >>> est = AccuracyEstimator(window=400).calibrate(conf, correct)
    >>> est.observe(torch.rand(400, generator=g) * 0.6 + 0.4)  # less sure now
    >>> round(est.estimate, 2) < round(float(correct.float().mean()), 2)
    True
    """

    _state_keys = ("threshold", "reference_accuracy", "_calibration", "_window_state", "_classes_state",
                   "_atypical_state")
    _window_state = DequeState("_scores", torch.float64)
    _classes_state = DequeState("_classes", torch.long)
    _atypical_state = DequeState("_atypical", torch.bool)

    def __init__(self, window: int = 500) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.threshold: float | None = None  # None: no labelled reference, average confidence instead
        self.reference_accuracy: float | None = None
        # The reference's calibration map: (2, K) knots (confidence, how often the reference was right
        # at it), monotone; None without reference labels.
        self._calibration: torch.Tensor | None = None
        self._scores: deque[float] = deque(maxlen=window)
        # The predicted classes of the same window (saved), and the reference's predicted-class shares
        # (derived from the reference, not saved): the `class_bound` cross-check.
        self._classes: deque[int] = deque(maxlen=window)
        self._ref_shares: torch.Tensor | None = None
        self._ref_count = 0
        # What the bound reads on a window of traffic in the reference's class mix (derived): below 1,
        # as both shares are samples, so the estimate is discounted by the bound relative to it.
        self._null_bound = 1.0
        # Whether each recent input was atypical (saved), and what decides it (derived): the
        # reference's projected features, standardised ((R, k) float32), their per-axis centre and
        # scale, and the radius 99% of them lie within.
        self._atypical: deque[bool] = deque(maxlen=window)
        self._ref_points: torch.Tensor | None = None
        self._scale: tuple[torch.Tensor, torch.Tensor] | None = None
        self._radius = 0.0

    def calibrate(self, confidence: torch.Tensor, correct: torch.Tensor | None,
                  classes: torch.Tensor | None = None, points: torch.Tensor | None = None) -> "AccuracyEstimator":
        """Threshold from reference confidences (R,) and whether each reference prediction was right;
        `classes` (R,): the reference's predicted classes, for `class_bound`; `points` (R, k): its
        features projected onto a few axes, for `atypical_share` (None: no such check)."""
        conf = confidence.detach().double().cpu().flatten()
        if classes is not None:
            pred = classes.detach().cpu().long().flatten()
            self._ref_shares = torch.bincount(pred, minlength=int(pred.max()) + 1).double() / len(pred)
            self._ref_count = len(pred)
            self._null_bound = _null_bound(self._ref_shares, self._ref_count, self.window)
        self._fit_points(points)
        if correct is None:
            self.threshold, self.reference_accuracy, self._calibration = None, None, None
            return self
        self._calibration = isotonic(conf, correct.detach().double().cpu().flatten())
        acc = float(correct.double().mean())
        self.reference_accuracy = acc
        # t with mean(conf > t) == acc: the (1 - acc) quantile of the reference confidences
        self.threshold = float(torch.quantile(conf, min(max(1.0 - acc, 0.0), 1.0))) if acc < 1 else \
            float(conf.min()) - 1e-9
        return self

    def _fit_points(self, points: torch.Tensor | None) -> None:
        """The reference's standardised points and the radius (leave-one-out) 99% of them lie within.
        The marks of the window stay: read against a version's reference before this one, they are
        still the best evidence of what the recent inputs were."""
        if points is None or points.dim() != 2 or len(points) <= NEIGHBOURS or not bool(torch.isfinite(points).all()):
            self._ref_points, self._scale = None, None
            return
        p = points.detach().cpu().double()
        centre, scale = p.mean(0), p.std(0).clamp_min(1e-12)
        ref = ((p - centre) / scale).float()
        d = torch.cdist(ref, ref)
        d.fill_diagonal_(float("inf"))
        self._radius = float(torch.quantile(d.topk(NEIGHBOURS, largest=False).values.mean(1).double(),
                                            TYPICAL_QUANTILE))
        self._ref_points, self._scale = ref, (centre, scale)

    def observe(self, confidence: torch.Tensor, classes: torch.Tensor | None = None,
                points: torch.Tensor | None = None) -> None:
        """A batch's top-class probabilities (B,), predicted classes (B,) and projected features (B, k)."""
        self._scores.extend(confidence.detach().double().cpu().flatten().tolist())
        if classes is not None:
            self._classes.extend(classes.detach().cpu().long().flatten().tolist())
        if points is not None and self._ref_points is not None and len(points):
            centre, scale = self._scale
            z = ((points.detach().cpu().double() - centre) / scale).float()
            dist = torch.cdist(z, self._ref_points).topk(NEIGHBOURS, largest=False).values.mean(1)
            self._atypical.extend((dist > self._radius).tolist())

    def atypical_share(self) -> float | None:
        """The share of recent inputs farther from the reference than 99% of its own (about 0.01
        while the inputs are like it). None without reference points or before half a window."""
        if self._ref_points is None or len(self._atypical) < max(self.window // 2, 1):
            return None
        return sum(self._atypical) / len(self._atypical)

    def class_bound(self) -> float | None:
        """The highest accuracy the recent predicted classes allow if the classes sent are still in
        the reference's proportions: 1 - total variation between the recent predicted-class shares
        and the reference's (a prediction moved out of its class is wrong). None before half a
        window of classes. An estimate far above it means the model errs where it is sure (or the
        class mix changed): on rotated, translated or brightened digits ATC said 0.79-0.80 at
        6-27% accuracy, and this bound said 0.34-0.56. Both shares are samples (a window, the
        reference), so each class's difference is shrunk by its sampling noise (d^2 - var), or the
        bound of unshifted traffic would read 0.87-0.90 on ten classes."""
        if self._ref_shares is None or len(self._classes) < max(self.window // 2, 1):
            return None
        return _bound(torch.tensor(list(self._classes)), self._ref_shares, self._ref_count)

    def _capped(self, value: float) -> float:
        """`value` discounted by the class bound where many recent inputs are atypical (the bound, a
        pass over the window, only then)."""
        share = self.atypical_share()
        gated = share is not None and share >= ATYPICAL_GATE
        return _cap(value, share, self.relative_bound() if gated else None)

    def relative_bound(self) -> float | None:
        """The class bound relative to what it reads on traffic in the reference's class mix (at
        most 1): the share of predictions the class mix leaves possibly right, sampling noise aside."""
        return self._relative(self.class_bound())

    def _relative(self, bound: float | None) -> float | None:
        return None if bound is None else min(bound / self._null_bound, 1.0)

    def predicts_correct(self, confidence: torch.Tensor) -> torch.Tensor:
        """ATC's per-prediction view (B,): above the threshold counts as right."""
        conf = confidence.detach().double().cpu().flatten()
        return conf > self.threshold if self.threshold is not None else conf

    @property
    def atc(self) -> float | None:
        """ATC itself over the recent predictions (None before any): the estimate before any cap."""
        if not self._scores:
            return None
        scores = self._window_state
        return float((scores > self.threshold).double().mean()) if self.threshold is not None else float(scores.mean())

    def calibrated_correct(self, confidence: torch.Tensor) -> torch.Tensor | None:
        """How often the reference was right at these confidences (B,), by its calibration map; None
        without reference labels."""
        if self._calibration is None:
            return None
        return interpolate(confidence.detach().double().cpu().flatten(), self._calibration)

    @property
    def calibrated(self) -> float | None:
        """The recent predictions' mean calibrated confidence (CBPE's estimate; None before any or
        without reference labels)."""
        if not self._scores or self._calibration is None:
            return None
        return float(self.calibrated_correct(self._window_state).mean())

    @property
    def uncapped(self) -> float | None:
        """The lower of ATC and the calibrated confidence (None before any prediction)."""
        return _lower(self.atc, self.calibrated)

    @property
    def estimate(self) -> float | None:
        """Estimated accuracy of the recent predictions (None before any): the lower of ATC and the
        calibrated confidence, times the class bound where the inputs are unlike the reference."""
        value = self.uncapped
        return None if value is None else self._capped(value)

    def corrected(self, labelled: dict | None) -> float | None:
        """Each view moved by what labels observed of it (+ (observed - its estimate on the
        labelled) n / (n + prior)), the lower of the two, then discounted as `estimate` is."""
        atc, cal = self.atc, self.calibrated
        if atc is None or not labelled or not labelled.get("n"):
            return None if atc is None else self._capped(_lower(atc, cal))
        n = labelled["n"]
        weight = n / (n + PRIOR_LABELS)
        value = atc + (labelled["observed"] - labelled["estimated"]) * weight
        if cal is not None and labelled.get("calibrated") is not None:
            value = min(value, cal + (labelled["observed"] - labelled["calibrated"]) * weight)
        return self._capped(min(max(value, 0.0), 1.0))

    def load_state_dict(self, state: dict) -> None:
        """As `StateMixin`'s; a state saved before the classes and atypical marks were kept has none
        (its bound and cap come back as the window refills), and one saved before the calibration
        map was kept estimates by ATC alone, as it did."""
        self.check_state_keys(state, optional=("_classes_state", "_atypical_state", "_calibration"))
        empty = {"_classes_state": torch.zeros(0, dtype=torch.long), "_atypical_state": torch.zeros(0, dtype=torch.bool),
                 "_calibration": None}
        super().load_state_dict({**empty, **state})

    def status(self) -> dict:
        atc, cal, share, bound = self.atc, self.calibrated, self.atypical_share(), self.class_bound()
        est = None if atc is None else _cap(_lower(atc, cal), share, self._relative(bound))  # one pass for both
        method = ("average confidence (no reference labels)" if self.threshold is None else
                  "atc" if self._calibration is None else "lower of atc and calibrated confidence")
        return {"method": method, "estimate": None if est is None else round(est, 4),
                "atc": None if atc is None else round(atc, 4),
                "calibrated": None if cal is None else round(cal, 4), "threshold": self.threshold,
                "reference_accuracy": self.reference_accuracy, "window": len(self._scores),
                "atypical_share": None if share is None else round(share, 4),
                "class_bound": None if bound is None else round(bound, 4),
                "class_bound_null": round(self._null_bound, 4)}


def isotonic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The monotone (non-decreasing) least-squares fit of y (N,) on x (N,), pool-adjacent-violators
    over x's distinct values: (2, K) knots, each a pooled block's mean x and mean y."""
    values, inverse = torch.unique(x.double(), return_inverse=True)
    counts = torch.bincount(inverse).double()
    sums = torch.bincount(inverse, weights=y.double())
    blocks: list[list[float]] = []  # [sum of y, count, sum of x]
    for v, n, s in zip(values.tolist(), counts.tolist(), sums.tolist()):
        blocks.append([s, n, v * n])
        # pool while the previous block's mean is at least this one's
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] >= blocks[-1][0] * blocks[-2][1]:
            s2, n2, x2 = blocks.pop()
            blocks[-1] = [blocks[-1][0] + s2, blocks[-1][1] + n2, blocks[-1][2] + x2]
    return torch.tensor([[b[2] / b[1] for b in blocks], [b[0] / b[1] for b in blocks]], dtype=torch.float64)


def interpolate(x: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """The piecewise-linear map through `knots` (2, K) at x (N,), flat beyond the ends."""
    kx, ky = knots[0], knots[1]
    if len(kx) == 1:
        return ky.expand(len(x)).clone()
    i = torch.searchsorted(kx, x.contiguous()).clamp(1, len(kx) - 1)
    x0, x1, y0, y1 = kx[i - 1], kx[i], ky[i - 1], ky[i]
    w = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return y0 + w * (y1 - y0)


def _lower(atc: float | None, calibrated: float | None) -> float | None:
    """The lower of ATC and the calibrated confidence (ATC where there is no calibrated view)."""
    return atc if calibrated is None or atc is None else min(atc, calibrated)


NULL_DRAWS = 64  # simulated windows of unshifted traffic for the bound's no-shift reading


def _bound(recent: torch.Tensor, ref_shares: torch.Tensor, ref_count: int) -> float:
    """`AccuracyEstimator.class_bound` of the predicted classes `recent` (n,) against the reference's
    class shares from `ref_count` predictions."""
    k = max(len(ref_shares), int(recent.max()) + 1)
    shares = torch.bincount(recent, minlength=k).double() / len(recent)
    ref = torch.nn.functional.pad(ref_shares, (0, k - len(ref_shares)))
    return float(_bounds(shares[None], ref[None], len(recent), ref_count)[0])


def _bounds(shares: torch.Tensor, ref: torch.Tensor, n: int, ref_count: int) -> torch.Tensor:
    """Rows of 1 - total variation between class shares (D, k) of n predictions and the reference's
    (D, k) of `ref_count`, each class's difference shrunk by the sampling noise of both: (D,)."""
    noise = shares * (1 - shares) / n + ref * (1 - ref) / max(ref_count, 1)
    return 1.0 - 0.5 * ((shares - ref) ** 2 - noise).clamp_min(0).sqrt().sum(1)


def _null_bound(ref_shares: torch.Tensor, ref_count: int, window: int) -> float:
    """The bound's mean reading where nothing shifted: reference samples of `ref_count` and windows
    of `window` predictions, all drawn from the reference's class shares (seeded: the same at every
    start). The noise shrinkage leaves it a few points below 1 (0.96-0.97 on ten classes at 500 a
    window; 0.70 on a thousand), which the estimate must not read as errors."""
    g = torch.Generator().manual_seed(0)
    p = ref_shares.double()

    def shares(size: int) -> torch.Tensor:
        # class counts as Poisson draws (a multinomial's counts, less the fixed total): a cost in
        # classes, not in samples, so a large reference calibrates in milliseconds at every publish
        counts = torch.poisson((p * size).expand(NULL_DRAWS, -1).contiguous(), generator=g)
        return counts / counts.sum(1, keepdim=True).clamp_min(1.0)

    ref = shares(ref_count)
    return min(max(float(_bounds(shares(window), ref, window, ref_count).mean()), 1e-6), 1.0)


def _cap(value: float, share: float | None, bound: float | None) -> float:
    """`value` times `bound` where the atypical `share` reaches the gate: the confidence-based view
    and the class mix as independent witnesses of the errors (at most the lower of the two)."""
    if share is None or share < ATYPICAL_GATE or bound is None:
        return value
    return value * min(max(bound, 0.0), 1.0)


class LabelledAccuracy(StateMixin):
    """The learning side's view: observed accuracy of labelled predictions, and what ATC and the
    calibrated confidence estimated for them."""

    _state_keys = ("_items_state",)

    def __init__(self, window: int = 200) -> None:
        self.window = window
        # (correct, ATC says correct, calibrated probability of correct; NaN: no calibration map)
        self._items: deque[tuple[float, float, float]] = deque(maxlen=window)

    def add(self, correct: torch.Tensor, atc_correct: torch.Tensor, calibrated: torch.Tensor | None = None) -> None:
        cal = calibrated if calibrated is not None else torch.full((len(correct),), float("nan"))
        self._items.extend(zip(correct.double().tolist(), atc_correct.double().tolist(), cal.double().tolist()))

    def summary(self) -> dict:
        if not self._items:
            return {"n": 0, "observed": None, "estimated": None, "calibrated": None}
        c, a, p = zip(*self._items)
        known = [v for v in p if v == v]
        return {"n": len(c), "observed": round(sum(c) / len(c), 4), "estimated": round(sum(a) / len(a), 4),
                # the calibrated view only where every labelled prediction has it (one map's view)
                "calibrated": round(sum(known) / len(known), 4) if len(known) == len(p) else None}

    @property
    def _items_state(self) -> torch.Tensor:
        return torch.tensor(list(self._items), dtype=torch.float64).reshape(-1, 3)

    @_items_state.setter
    def _items_state(self, value: torch.Tensor) -> None:
        if value.dim() == 2 and value.shape[1] == 2:  # saved before the calibrated view was kept
            value = torch.cat([value, torch.full((len(value), 1), float("nan"), dtype=value.dtype)], 1)
        self._items = deque([tuple(r) for r in value.tolist()], maxlen=self.window)
