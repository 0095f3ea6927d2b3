"""Core's own backends and pool, registered through the same hooks as any third-party plugin.

Each backend lives in its own module and implements :class:`dilated_attn.request.AttentionBackend`;
nothing heavy is imported until a backend first runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from dilated_attn.hookspecs import hookimpl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@hookimpl
def dilated_attn_register_attention(register: Callable[..., None]) -> None:
    """Register "reference" (the float64 oracle), "sdpa" (gather + fused blocks + LSE merge) and,
    where Triton is installed, "triton" (the fused kernels)."""
    from dilated_attn.backends.reference import reference_backend
    from dilated_attn.backends.sdpa import sdpa_backend

    register(
        "reference",
        reference_backend,
        dtypes=_DTYPES,
        key_padding_mask=True,
        gqa=True,
        priority=-100,
        description="dense float64 oracle, O(h n^2)",
    )
    register(
        "sdpa",
        sdpa_backend,
        dtypes=_DTYPES,
        key_padding_mask=True,
        dropout=True,
        pool=True,
        priority=10,
        description="per-pattern gather, fused SDPA kernels with LSE, exact LSE merge",
    )
    if importlib.util.find_spec("triton") is not None:
        from dilated_attn.backends.triton import register_triton

        register_triton(register)


@hookimpl
def dilated_attn_register_pool(register: Callable[..., None]) -> None:
    """Register the pure-Python buffer pool as "python"."""
    from dilated_attn.pool import PythonBufferPool

    register("python", PythonBufferPool, priority=0, thread_safe=True)
