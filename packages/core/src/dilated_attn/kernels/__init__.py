"""Fused Triton kernels for dilated attention, registered as the "triton" backend.

Importing this package imports Triton; ``dilated_attn.backends`` treats an ``ImportError`` here as
"no Triton installed" and registers the portable backends only.
"""

from collections.abc import Callable

from dilated_attn.kernels.op import DTYPES, triton_dilated_attention


def register_backends(register: Callable[..., None]) -> None:
    """Register "triton": CUDA, fp16/bf16/fp32, both modes, causal, backward; preferred by ``auto``."""
    register(
        "triton",
        triton_dilated_attention,
        devices=("cuda",),
        dtypes=DTYPES,
        modes=("longnet", "head_groups"),
        causal=True,
        backward=True,
        priority=20,
        dropout=False,
        head_dims=(16, 256),
        description="fused Triton kernels: strided loads, online softmax, in-place LSE merge",
    )


__all__ = ["register_backends", "triton_dilated_attention"]
