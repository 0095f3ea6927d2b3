"""The "block_sparse" attention backend, registered through the ``dilated_attn`` plugin hook."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from dilated_attn import hookimpl

from dilated_attn_sparse.attention import block_sparse_attention
from dilated_attn_sparse.patterns import SparsePattern


def block_sparse_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    mode: str,
    causal: bool,
    scale: float | None,
    dropout_p: float,
    return_lse: bool,
    pattern: SparsePattern | None = None,
    block_size: int = 128,
    kernel_options: Mapping[str, Any] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention on ``(b, n, h, d)``: ``pattern`` alone decides the keys.

    ``segment_lengths``, ``dilation_rates`` and ``mode`` are not used; express dilation with
    ``dilated_blocks`` in the pattern.
    """
    if pattern is None:
        raise ValueError(
            "backend='block_sparse' requires pattern=... (a dilated_attn_sparse pattern such as "
            "local_window(256) | dilated_blocks(16, 4)); got pattern=None"
        )
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p} is not supported by backend='block_sparse' (it must be 0)")
    return block_sparse_attention(
        q,
        k,
        v,
        pattern,
        causal=causal,
        scale=scale,
        block_size=block_size,
        return_lse=return_lse,
        kernel_options=kernel_options,
    )


@hookimpl
def dilated_attn_register_attention(register: Callable[..., Any]) -> None:
    """Register "block_sparse": FlexAttention over a sparse pattern (needs ``pattern=``)."""
    register(
        "block_sparse",
        block_sparse_backend,
        devices=("cpu", "cuda"),
        dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64),
        causal=True,
        backward=True,
        requires=("pattern",),
        auto=False,
        description="block-sparse softmax attention on FlexAttention; the pattern decides the keys",
    )
