"""Core's own backends and pool, registered through the same hooks as any third-party plugin."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dilated_attn.hookspecs import hookimpl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@hookimpl
def dilated_attn_register_attention(register: Callable[..., None]) -> None:
    """Register "reference" (the float64 oracle) and "sdpa" (gather + fused blocks + LSE merge)."""
    from dilated_attn.functional import reference_dilated_attention, sdpa_dilated_attention

    register(
        "reference",
        reference_dilated_attention,
        devices=("cpu", "cuda"),
        dtypes=_DTYPES,
        key_padding_mask=True,
        dropout=False,
        priority=-100,
        description="dense float64 oracle, O(h n^2)",
    )
    register(
        "sdpa",
        sdpa_dilated_attention,
        devices=("cpu", "cuda"),
        dtypes=_DTYPES,
        key_padding_mask=True,
        priority=10,
        pool=True,
        description="per-pattern gather, fused SDPA kernels with LSE, exact LSE merge",
    )
    try:
        from dilated_attn.kernels import register_backends
    except ImportError:
        return
    register_backends(register)


@hookimpl
def dilated_attn_register_pool(register: Callable[..., None]) -> None:
    """Register the pure-Python buffer pool as "python"."""
    from dilated_attn.pool import PythonBufferPool

    register("python", PythonBufferPool, priority=0, thread_safe=True)
