"""The demo CNN's training cache: a cached call gives the same weights and leaves the RNG as training does."""
from __future__ import annotations

import pytest
import torch

from selfheal_bench import train as training


def test_a_cached_model_and_rng_state_equal_a_trained_one(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "CACHE", tmp_path)
    first, info = training.train(seed=3, epochs=1)
    after_training = torch.rand(4)
    assert len(list(tmp_path.glob("digits_cnn-*.pt"))) == 1
    second, cached_info = training.train(seed=3, epochs=1)
    assert torch.equal(torch.rand(4), after_training) and cached_info == info
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    next(tmp_path.glob("digits_cnn-*.pt")).write_bytes(b"damaged")  # a damaged entry is trained again
    third, _ = training.train(seed=3, epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), third.state_dict().values()))


def test_an_example_trained_twice_is_trained_once(tmp_path, monkeypatch):
    """The examples' networks (selfheal_bench.examples) are cached too, keyed by what they depend on."""
    from selfheal_bench.examples.tabular_model import TabularMLP

    monkeypatch.setattr(training, "CACHE", tmp_path)
    x, y = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 3
    make = lambda: TabularMLP(n_features=10, hidden=8, n_classes=3)  # noqa: E731
    first = training.cached_fit("t", make, x, y, epochs=2)
    after_training = torch.rand(4)
    trained = training.fit
    monkeypatch.setattr(training, "fit", lambda *a, **k: pytest.fail("a cached network was trained again"))
    second = training.cached_fit("t", make, x, y, epochs=2)
    monkeypatch.setattr(training, "fit", trained)
    assert torch.equal(torch.rand(4), after_training) and len(list(tmp_path.glob("t-*.pt"))) == 1
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    training.cached_fit("t", make, x, 2 - y, epochs=2)  # other labels: another entry
    assert len(list(tmp_path.glob("t-*.pt"))) == 2
