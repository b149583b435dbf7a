"""Fashion-MNIST-C as the real-data benchmark makes it: from the Debian package, never downloaded."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from selfheal_bench import real


def test_missing_dataset_names_the_package_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFHEAL_FASHION_MNIST", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        real.load_fashion_mnist()


def test_missing_corruption_code_names_the_package_to_install(tmp_path, monkeypatch, fashion_mnist):
    monkeypatch.setattr(real, "CACHE", tmp_path)  # nothing cached: the code is needed
    monkeypatch.setitem(sys.modules, "corrupt_tta", None)  # import fails as when not installed
    with pytest.raises(ImportError, match="pip install corrupt-tta"):
        real.corrupted("fog", 5, 4)


def test_corrupted_domains_are_cached_and_the_same_every_time(tmp_path, monkeypatch, fashion_mnist):
    monkeypatch.setattr(real, "CACHE", tmp_path)
    x, y = real.corrupted("gaussian_noise", 5, 6)
    clean, y_clean = real.corrupted("clean", 0, 6)
    assert x.shape == (6, 32, 32, 3) and x.dtype == np.uint8 and (y == y_clean).all()
    assert np.abs(x.astype(int) - clean.astype(int)).mean() > 20  # severity 5 noise moved the pixels
    assert list(tmp_path.rglob("gaussian_noise-5-6.npy"))  # cached ...
    monkeypatch.setitem(sys.modules, "corrupt_tta", None)
    again, _ = real.corrupted("gaussian_noise", 5, 6)  # ... and read back without the code
    assert (again == x).all()
    with pytest.raises(ValueError, match="unknown domain"):
        real.corrupted("rain", 5, 6)


def test_images_are_padded_to_32_and_given_three_equal_channels():
    x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    rgb = real.to_rgb32(x)
    assert rgb.shape == (2, 32, 32, 3) and (rgb[:, 2:30, 2:30, 1] == x).all() and (rgb[:, :2] == 0).all()
    t = real.as_tensor(rgb)
    assert t.shape == (2, 3, 32, 32) and float(t.max()) <= 1.0
