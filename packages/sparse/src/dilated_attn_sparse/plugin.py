"""The "block_sparse" attention backend, registered through the ``dilated_attn`` plugin hook.

Registering imports nothing heavy: FlexAttention is imported when the backend first runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from dilated_attn import hookimpl
from dilated_attn.pattern import DilationPattern
from dilated_attn.request import Request


def block_sparse_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: DilationPattern, request: Request
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention on ``(b, n, h, d)``: the sparse ``pattern=`` option alone decides the keys.

    The dilation pattern is not used (express dilation with ``dilated_blocks`` in the sparse pattern);
    ``block_size=`` and ``kernel_options=`` go to :func:`block_sparse_attention`.
    """
    from dilated_attn_sparse.attention import block_sparse_attention

    options = request.options
    return block_sparse_attention(
        q,
        k,
        v,
        options["pattern"],
        causal=request.causal,
        scale=request.scale,
        block_size=options.get("block_size", 128),
        return_lse=True,
        kernel_options=options.get("kernel_options"),
    )


@hookimpl
def dilated_attn_register_attention(register: Callable[..., Any]) -> None:
    """Register "block_sparse": FlexAttention over a sparse pattern (needs ``pattern=``)."""
    register(
        "block_sparse",
        block_sparse_backend,
        dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64),
        modes=("longnet",),
        options=("pattern", "block_size", "kernel_options"),
        requires=("pattern",),
        auto=False,
        description="block-sparse softmax attention on FlexAttention; the pattern decides the keys",
    )
