"""Both pools under one parametrised fixture; the Rust one only where dilated-attn-pool is installed."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from dilated_attn.pool import BufferPool, PythonBufferPool

PoolFactory = Callable[..., BufferPool]


def _rust_pool_class() -> PoolFactory:
    return pytest.importorskip("dilated_attn_pool").RustBufferPool


@pytest.fixture(params=["python", "rust"])
def make_pool(request: pytest.FixtureRequest) -> PoolFactory:
    """``make_pool(budget_bytes=None)`` for each pool implementation."""
    if request.param == "rust":
        return _rust_pool_class()
    return PythonBufferPool


@pytest.fixture
def rust_pool_class() -> PoolFactory:
    return _rust_pool_class()
