"""The "triton" backend: the fused kernels of ``dilated_attn.kernels`` (imported on first use).

Strided views and loads (no gather copies), one pattern at a time merged in place by log-sum-exp. A
pattern's segments run on cuDNN's fused attention over strided views (the segment engine,
``dilated_attn.kernels.segments``: sm_90+, fp16/bf16, head_dim a multiple of 8 up to 128, K/V heads
equal to query heads) or on the Triton kernels (everything else, forwards at head_dim <= 32 and
backwards at <= 16, where they are faster, LSE gradients, deterministic backwards,
``DILATED_ATTN_ENGINE=triton``). CUDA only, or the CPU under ``TRITON_INTERPRET=1``
(Triton's interpreter, for tests at small sizes: they register ``triton_backend`` for the CPU under a
name of their own).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dilated_attn.pattern import DilationPattern
from dilated_attn.request import Request

# Kept in step with dilated_attn.kernels.op (checked by a test) so registering imports no Triton.
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 256)


def triton_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: DilationPattern, request: Request
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention through ``torch.ops.dilated_attn.triton_fwd`` (differentiable)."""
    import dilated_attn.kernels  # noqa: F401 (registers the custom ops)

    return torch.ops.dilated_attn.triton_fwd(
        q,
        k,
        v,
        list(pattern.segment_lengths),
        list(pattern.dilation_rates),
        request.mode,
        request.causal,
        request.scale,
    )


def register_triton(register: Callable[..., None]) -> None:
    """Register "triton": CUDA, fp16/bf16/fp32, head_dim 16..256, grouped K/V heads read in place,
    preferred by ``auto``."""
    register(
        "triton",
        triton_backend,
        devices=("cuda",),
        dtypes=DTYPES,
        head_dims=HEAD_DIMS,
        gqa=True,
        priority=20,
        description="fused kernels: cuDNN attention on strided views (sm_90+, 16-bit, d <= 128) or Triton "
        "kernels with strided loads; in-place LSE merge",
    )
