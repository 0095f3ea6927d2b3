"""The ``dilated_attn`` plugin of this package: registers ``RustBufferPool`` as pool "rust"."""

from __future__ import annotations

from collections.abc import Callable

from dilated_attn import hookimpl


@hookimpl
def dilated_attn_register_pool(register: Callable[..., None]) -> None:
    """Register ``RustBufferPool`` as "rust", preferred over "python" when both are installed."""
    from dilated_attn_pool import RustBufferPool

    register("rust", RustBufferPool, priority=10, thread_safe=True)
