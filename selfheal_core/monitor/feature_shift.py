"""Feature-shift detector: a multivariate EWMA chart on whitened projections of features.

Features are the penultimate activations of the served model (or the inputs of
a small tabular model). The reference sample fixes a centre and a whitening
onto its top principal directions; the chart watches the running mean of the
whitened projections. Cost per sample does not grow with
the stream: O(dims^2) for the projection, a fixed state vector.
"""
from __future__ import annotations

import numpy as np
import torch

from selfheal_core.monitor.base import REPLICAS, MewmaDetector, as_array

# digests of axes fitted in two processes on the same reference differ by float noise (a conv's
# batch size changes its last bits); a flipped or swapped axis moves entries by ~1
AXES_TOLERANCE = 1e-3


class FeatureShiftDetector(MewmaDetector):
    """MEWMA on `dims` whitened principal projections of reference features.

    >>> g = torch.Generator().manual_seed(1)
    >>> det = FeatureShiftDetector(expected_run_time=10_000).calibrate(torch.randn(300, 16, generator=g))
    >>> _ = det.update(torch.randn(1000, 16, generator=g))
    >>> det.alarms
    0
    >>> for i in range(200):
    ...     if det.update(torch.randn(1, 16, generator=g) + 0.5).drift_detected:
    ...         print(f"drift detected after {i + 1} shifted samples")
    ...         break
    drift detected after 23 shifted samples
    """

    _state_keys = MewmaDetector._state_keys + ("_axes", "_center", "_white")
    # what an update changes: the centre and whitening along the axes, which stay those of the
    # reference as first calibrated. So a learner in another process hands a worker (k + k^2)
    # numbers per version, not the reference's features (issue 28: a 224x224 ResNet's view of
    # 128 images was ten times its published weights); `axes_digest` proves both hold the same axes.
    _reference_keys = ("_center", "_white")

    def __init__(self, expected_run_time: int = 10_000, dims: int = 8, lam: float = 0.05,
                 margin: float = 0.6, paths: int = 200, seed: int = 0) -> None:
        if dims < 1:
            raise ValueError(f"dims must be >= 1, got {dims}")
        self.dims = dims
        self._axes = torch.zeros(0, 0, dtype=torch.float64)  # (D, k) top principal directions, fixed
        self._center = torch.zeros(0, dtype=torch.float64)  # (k,) reference mean along them
        self._white = torch.zeros(0, 0, dtype=torch.float64)  # (k, k) whitening along them
        super().__init__(expected_run_time, lam, margin, paths, seed)

    def calibrate(self, reference, threshold: float | None = None) -> "FeatureShiftDetector":
        """Fit centre and whitening on reference vectors (R, D) and set the threshold.

        The axes are the top principal directions of a third of the reference;
        the whitening of the projections onto them is the inverse square root of
        their covariance on the other two thirds. Measured on the sample that
        chose them, variances along the top axes are inflated (the top
        eigenvalues of a 64-D covariance from a few hundred points over-state
        the truth), which would make the chart far too quiet.

        Even so, a k x k covariance estimated from m vectors is off by a factor
        like (1 +- sqrt(k/m))^2 in some direction, and a centre by ~1/sqrt(R):
        the threshold is calibrated on streams with such errors, a fresh draw
        (Wishart covariance error, Gaussian centre error) for each group of
        simulated paths, as if from `margin` times fewer vectors. The margin
        stands for benign differences between live traffic and the reference
        sample (live traffic is itself never the population the reference was
        drawn from): with margin 1 the demo model alarmed ~3x too often on its
        clean test split; 0.6 meets the target there and is conservative on
        exactly Gaussian streams. The chart averages ~1/lam samples, so a
        Gaussian stream model suffices even for skewed ReLU features.
        """
        ref = as_array(reference, "FeatureShiftDetector.calibrate", 2)
        n = len(ref)
        k, m = self._fit(ref)
        if threshold is not None:
            self._calibrate(None, k, self.expected_run_time, self.paths, self.seed, threshold=threshold)
            return self
        rng, groups = np.random.default_rng(self.seed + 1), max(self.paths // REPLICAS, 1)
        m_eff, n_eff = max(int(m * self.margin), k + 2), max(int(n * self.margin), 1)
        factors, offsets = [], []
        for _ in range(groups):
            g = rng.standard_normal((m_eff - 1, k))
            truth = np.linalg.inv(g.T @ g / (m_eff - 1))  # live covariance in whitened units
            root = np.linalg.cholesky(truth)
            factors.append(root)
            offsets.append(root @ rng.standard_normal(k) / np.sqrt(n_eff))  # centre error
        factor = np.repeat(np.stack(factors), REPLICAS, axis=0).astype(np.float32)  # (paths, k, k)
        offset = np.repeat(np.stack(offsets), REPLICAS, axis=0).astype(np.float32)  # (paths, k)

        def draw(rng: np.random.Generator, paths: int, steps: int) -> np.ndarray:
            eps = rng.standard_normal((paths, steps, k), dtype=np.float32)
            return offset[:paths, None] + np.matmul(eps, factor[:paths].transpose(0, 2, 1))

        self._calibrate(draw, k, self.expected_run_time, len(offset), self.seed, groups)
        return self

    def _fit(self, ref: np.ndarray) -> tuple[int, int]:
        """Axes, centre and whitening from reference vectors (R, D); returns (axes kept, vectors
        whitened on)."""
        n, dim = ref.shape
        if n < 30:
            raise ValueError("calibration needs at least 30 reference vectors")
        fit, _ = self._split(ref)
        evals, evecs = np.linalg.eigh(np.cov(fit, rowvar=False).reshape(dim, dim))
        axes = evecs[:, np.argsort(evals)[::-1][: min(self.dims, dim)]]  # (D, k)
        # each axis's sign fixed by a seeded direction: two processes reading the same reference
        # (a learner, a worker) get the same axes, not mirror images
        flip = np.sign(self._probe(dim)[:, 0] @ axes)
        self._axes = torch.from_numpy(axes * np.where(flip == 0, 1.0, flip))
        return self._axes.shape[1], self._whitening(ref)

    def _split(self, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(a third that chooses the axes, two thirds that whiten along them), by a seeded draw."""
        perm = np.random.default_rng(self.seed).permutation(len(ref))
        return ref[perm[: len(ref) // 3]], ref[perm[len(ref) // 3:]]

    def _whitening(self, ref: np.ndarray) -> int:
        """Centre and whitening along the axes; returns the vectors whitened on."""
        axes = self._axes.numpy()
        _, held = self._split(ref)
        k = axes.shape[1]
        cov = np.cov(held @ axes, rowvar=False).reshape(k, k)
        ev, vec = np.linalg.eigh(cov)
        self._center = torch.from_numpy(ref.mean(0) @ axes)
        self._white = torch.from_numpy((vec / np.sqrt(ev.clip(min=1e-12))) @ vec.T)
        return len(held)

    def _probe(self, dim: int) -> np.ndarray:
        """Two seeded Gaussian directions (D, 2): the first fixes the axes' signs, the second
        fingerprints them."""
        return np.random.default_rng(self.seed + 7).standard_normal((dim, 2))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Features (n, D) on the fixed axes (n, k), neither centred nor whitened: the same in every
        process that calibrated on the same reference, whatever versions each installed since."""
        return features.detach().to("cpu", torch.float64) @ self._axes

    def axes_digest(self) -> torch.Tensor:
        """(k,) fingerprint of the axes, each one's projection on a seeded direction: equal (to
        float noise) in processes that calibrated on the same reference, different where an axis
        flipped or two swapped."""
        probe = self._probe(self._axes.shape[0])
        return torch.from_numpy(self._axes.numpy().T @ probe[:, 1])

    def reference_state(self) -> dict[str, torch.Tensor]:
        return {**super().reference_state(), "axes_digest": self.axes_digest()}

    def load_reference(self, values: dict[str, torch.Tensor]) -> None:
        """As `Detector.load_reference`, and refused (nothing changes) when the values were fitted
        along other axes than this detector's: centre and whitening would not mean the same."""
        values = dict(values)
        digest = values.pop("axes_digest", None)
        if not isinstance(digest, torch.Tensor) or digest.shape != (self._axes.shape[1],) or \
                not torch.allclose(digest.double(), self.axes_digest(), rtol=0.0, atol=AXES_TOLERANCE):
            raise ValueError("FeatureShiftDetector: the reference statistics were fitted along other axes than "
                             "this detector's (another reference or settings)")
        super().load_reference(values)

    def load_state_dict(self, state: dict) -> None:
        """States saved before the axes were kept apart ((D,) centre, (D, k) projection) load as
        the same whitening: (x - c) P = x P - c P along axes P, whitening the identity."""
        if "_proj" in state and "_axes" not in state:
            state = dict(state)
            proj, center = state.pop("_proj"), state.pop("_center")
            k = proj.shape[1]
            state.update(_axes=proj, _center=center @ proj if len(center) else torch.zeros(k, dtype=torch.float64),
                         _white=torch.eye(k, dtype=torch.float64))
        super().load_state_dict(state)

    def rebase(self, reference) -> "FeatureShiftDetector":
        """New centre and whitening for the same reference inputs seen through updated weights.

        The threshold depends only on the axes kept, the reference size and the margin, so it
        stays; the running statistic is kept too. Without this, every labelled update that moves
        the features would read as drift.
        """
        if not self.calibrated:
            raise ValueError("rebase needs a calibrated detector")
        ref = as_array(reference, "FeatureShiftDetector.rebase", 2)
        if ref.shape[1] != len(self._axes):
            raise ValueError(f"rebase needs vectors of size {len(self._axes)}, got {ref.shape[1]}")
        if len(ref) < 30:
            raise ValueError("rebase needs at least 30 reference vectors")
        self._whitening(ref)  # the same axes, so the same dimension the threshold was set for
        return self

    def _whiten(self, values) -> np.ndarray:
        x = as_array(values, type(self).__name__, 2)
        if x.shape[1] != len(self._axes):
            raise ValueError(f"{type(self).__name__}: expected vectors of size {len(self._axes)}, got {x.shape[1]}")
        return (x @ self._axes.numpy() - self._center.numpy()) @ self._white.numpy()
