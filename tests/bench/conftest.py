"""The real-data tests need Debian's Fashion-MNIST: skipped with the install command where it is
missing, failed instead under SELFHEAL_REQUIRE_REAL_DATA=1 (what .ci/run sets)."""
from __future__ import annotations

import os

import pytest

from selfheal_bench import real


@pytest.fixture
def fashion_mnist() -> None:
    try:
        real.load_fashion_mnist()
    except FileNotFoundError as exc:
        if os.environ.get("SELFHEAL_REQUIRE_REAL_DATA") == "1":
            pytest.fail(f"SELFHEAL_REQUIRE_REAL_DATA=1 but {exc}")
        pytest.skip(str(exc))
