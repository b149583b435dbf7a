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
"""
from __future__ import annotations

from collections import deque

import torch

from selfheal_core.state import StateMixin

PRIOR_LABELS = 50  # labels before the observed difference counts as much as ATC itself


class AccuracyEstimator(StateMixin):
    """ATC over a window of recent predictions; without reference labels, the average confidence.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> conf = torch.rand(400, generator=g) * 0.5 + 0.5
    >>> correct = torch.rand(400, generator=g) < conf  # calibrated: right as often as it is sure
    >>> est = AccuracyEstimator(window=400).calibrate(conf, correct)
    >>> est.observe(torch.rand(400, generator=g) * 0.6 + 0.4)  # less sure now
    >>> round(est.estimate, 2) < round(float(correct.float().mean()), 2)
    True
    """

    _state_keys = ("threshold", "reference_accuracy", "_window_state")

    def __init__(self, window: int = 500) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.threshold: float | None = None  # None: no labelled reference, average confidence instead
        self.reference_accuracy: float | None = None
        self._scores: deque[float] = deque(maxlen=window)
        # The predicted classes of the same window, and the reference's predicted-class shares: the
        # `class_bound` cross-check. Derived from the reference and refilled by traffic, so they are
        # not part of the saved state (a restored estimator has no bound until its window refills).
        self._classes: deque[int] = deque(maxlen=window)
        self._ref_shares: torch.Tensor | None = None

    def calibrate(self, confidence: torch.Tensor, correct: torch.Tensor | None,
                  classes: torch.Tensor | None = None) -> "AccuracyEstimator":
        """Threshold from reference confidences (R,) and whether each reference prediction was right;
        `classes` (R,): the reference's predicted classes, for `class_bound`."""
        conf = confidence.detach().double().cpu().flatten()
        if classes is not None:
            pred = classes.detach().cpu().long().flatten()
            self._ref_shares = torch.bincount(pred, minlength=int(pred.max()) + 1).double() / len(pred)
        if correct is None:
            self.threshold, self.reference_accuracy = None, None
            return self
        acc = float(correct.double().mean())
        self.reference_accuracy = acc
        # t with mean(conf > t) == acc: the (1 - acc) quantile of the reference confidences
        self.threshold = float(torch.quantile(conf, min(max(1.0 - acc, 0.0), 1.0))) if acc < 1 else \
            float(conf.min()) - 1e-9
        return self

    def observe(self, confidence: torch.Tensor, classes: torch.Tensor | None = None) -> None:
        self._scores.extend(confidence.detach().double().cpu().flatten().tolist())
        if classes is not None:
            self._classes.extend(classes.detach().cpu().long().flatten().tolist())

    def class_bound(self) -> float | None:
        """The highest accuracy the recent predicted classes allow if the classes sent are still in
        the reference's proportions: 1 - total variation between the recent predicted-class shares
        and the reference's (a prediction moved out of its class is wrong). None before half a
        window of classes. An estimate far above it means the model errs where it is sure (or the
        class mix changed): on rotated, translated or brightened digits ATC said 0.79-0.80 at
        6-27% accuracy, and this bound said 0.34-0.56."""
        if self._ref_shares is None or len(self._classes) < max(self.window // 2, 1):
            return None
        recent = torch.tensor(list(self._classes))
        k = max(len(self._ref_shares), int(recent.max()) + 1)
        shares = torch.bincount(recent, minlength=k).double() / len(recent)
        ref = torch.nn.functional.pad(self._ref_shares, (0, k - len(self._ref_shares)))
        return 1.0 - 0.5 * float((shares - ref).abs().sum())

    def predicts_correct(self, confidence: torch.Tensor) -> torch.Tensor:
        """ATC's per-prediction view (B,): above the threshold counts as right."""
        conf = confidence.detach().double().cpu().flatten()
        return conf > self.threshold if self.threshold is not None else conf

    @property
    def estimate(self) -> float | None:
        """Estimated accuracy of the recent predictions (None before any)."""
        if not self._scores:
            return None
        scores = torch.tensor(list(self._scores), dtype=torch.float64)
        return float((scores > self.threshold).double().mean()) if self.threshold is not None else float(scores.mean())

    def corrected(self, labelled: dict | None) -> float | None:
        """The estimate moved by what labels observed: + (observed - ATC on the labelled) n / (n + prior)."""
        est = self.estimate
        if est is None or not labelled or not labelled.get("n"):
            return est
        n = labelled["n"]
        shift = (labelled["observed"] - labelled["estimated"]) * n / (n + PRIOR_LABELS)
        return min(max(est + shift, 0.0), 1.0)

    @property
    def _window_state(self) -> torch.Tensor:
        return torch.tensor(list(self._scores), dtype=torch.float64)

    @_window_state.setter
    def _window_state(self, value: torch.Tensor) -> None:
        self._scores = deque(value.tolist(), maxlen=self.window)

    def status(self) -> dict:
        est = self.estimate
        return {"method": "atc" if self.threshold is not None else "average confidence (no reference labels)",
                "estimate": None if est is None else round(est, 4), "threshold": self.threshold,
                "reference_accuracy": self.reference_accuracy, "window": len(self._scores)}


class LabelledAccuracy(StateMixin):
    """The learning side's view: observed accuracy of labelled predictions, and ATC's estimate for them."""

    _state_keys = ("_items_state",)

    def __init__(self, window: int = 200) -> None:
        self.window = window
        self._items: deque[tuple[float, float]] = deque(maxlen=window)  # (correct, ATC says correct)

    def add(self, correct: torch.Tensor, atc_correct: torch.Tensor) -> None:
        self._items.extend(zip(correct.double().tolist(), atc_correct.double().tolist()))

    def summary(self) -> dict:
        if not self._items:
            return {"n": 0, "observed": None, "estimated": None}
        c, a = zip(*self._items)
        return {"n": len(c), "observed": round(sum(c) / len(c), 4), "estimated": round(sum(a) / len(a), 4)}

    @property
    def _items_state(self) -> torch.Tensor:
        return torch.tensor(list(self._items), dtype=torch.float64).reshape(-1, 2)

    @_items_state.setter
    def _items_state(self, value: torch.Tensor) -> None:
        self._items = deque([tuple(r) for r in value.tolist()], maxlen=self.window)
