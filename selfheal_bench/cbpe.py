"""NannyML's CBPE (confidence-based performance estimation) as a peer of selfheal's accuracy estimate.

CBPE calibrates the model's probabilities on a labelled reference (isotonic regression per class)
and estimates a chunk's accuracy as the mean calibrated probability of the predicted class. It is
what users of monitoring tools compare a label-free accuracy estimate with. NannyML pulls
lightgbm, plotly and cloud filesystems and logs usage unless told not to, so it lives in the
`peers` extra, never in the package's requirements or the Docker image, and is imported with
usage logging off.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch


def load_nannyml():
    """(nannyml, pandas), imported with usage logging off; ImportError naming the extra when missing."""
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")  # no telemetry from a benchmark
    try:
        import nannyml
        import pandas
    except ImportError as exc:
        raise ImportError("NannyML is the estimate benchmark's peer: pip install -c constraints.txt "
                          "'.[peers]' (or pip install nannyml statsmodels)") from exc
    return nannyml, pandas


class Cbpe:
    """CBPE fitted on the reference's probabilities (R, C) and labels (R,); `estimate(probs)` is its
    accuracy estimate for one chunk of served probabilities (N, C). Two classes run as binary."""

    def __init__(self, reference_probs: torch.Tensor, reference_labels: torch.Tensor) -> None:
        self._nml, self._pd = load_nannyml()
        self.classes = reference_probs.shape[1]
        frame = self._frame(reference_probs, reference_labels)
        self._estimator = self._nml.CBPE(
            y_pred_proba=self._proba_columns(), y_pred="y_pred", y_true="y_true", metrics=["accuracy"],
            problem_type="classification_binary" if self.classes == 2 else "classification_multiclass",
            chunk_number=1)
        with warnings.catch_warnings():  # NannyML's own notes on pandas and plotting
            warnings.simplefilter("ignore")
            self._estimator.fit(frame)

    def _proba_columns(self):
        return "p1" if self.classes == 2 else {str(c): f"p{c}" for c in range(self.classes)}

    def _frame(self, probs: torch.Tensor, labels: torch.Tensor | None):
        p = probs.detach().double().cpu().numpy()
        pred = p.argmax(1)
        data = {f"p{c}": p[:, c] for c in range(self.classes)}
        if self.classes == 2:
            data = {"p1": p[:, 1]}
        cast = (lambda a: a) if self.classes == 2 else (lambda a: a.astype(str))  # noqa: E731
        data["y_pred"] = cast(pred)
        if labels is not None:
            data["y_true"] = cast(labels.cpu().numpy())
        return self._pd.DataFrame(data)

    def estimate(self, probs: torch.Tensor) -> float:
        """CBPE's accuracy estimate for these served probabilities, one chunk."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = self._estimator.estimate(self._frame(probs, None)).filter(period="analysis").to_df()
        values = [v for k, v in zip(result.columns, result.values[0]) if k[0] == "accuracy" and k[1] == "value"]
        return float(np.asarray(values, dtype=float)[0])
