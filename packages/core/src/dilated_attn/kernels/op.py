"""The fused kernels as PyTorch operators (the "triton" backend in ``dilated_attn.backends.triton`` calls them).

``dilated_attn::triton_fwd`` and ``dilated_attn::triton_bwd`` are ``torch.library`` custom ops with
fake (meta) implementations and registered autograd, so autograd, ``torch.compile(fullgraph=True)``
and CUDA graph capture see single opaque ops. Autotuning runs on the first call per head_dim, dtype and
causal flag: make that call before capturing a graph.
"""

# No `from __future__ import annotations`: torch.library reads the real annotations to infer schemas.
from typing import Any, Optional

import torch

from dilated_attn.kernels.backward import backward
from dilated_attn.kernels.forward import forward
from dilated_attn.kernels.launches import plan_launches

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256


@torch.library.custom_op("dilated_attn::triton_fwd", mutates_args=())
def triton_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: list[int],
    dilation_rates: list[int],
    mode: str,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention of ``q`` ``(b, n, h, d)`` and ``k``, ``v`` ``(b, n, h_kv, d)`` (``h_kv``
    dividing ``h``): ``out`` (input dtype) and ``lse`` ``(b, n, h)`` float32."""
    _, n, h, _ = q.shape
    plan = plan_launches(n, h, segment_lengths, dilation_rates, mode, k.shape[2])
    return forward(q, k, v, plan, causal=causal, scale=scale)


@triton_fwd.register_fake
def _(q, k, v, segment_lengths, dilation_rates, mode, causal, scale):
    b, n, h, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (b, n, h), dtype=torch.float32
    )


@torch.library.custom_op("dilated_attn::triton_bwd", mutates_args=())
def triton_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: Optional[torch.Tensor],  # noqa: UP045 (the schema inference reads typing.Optional)
    segment_lengths: list[int],
    dilation_rates: list[int],
    mode: str,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` (input dtype, shaped like ``q, k, v``) from the merged ``out`` and
    ``lse`` of the forward."""
    _, n, h, _ = q.shape
    plan = plan_launches(n, h, segment_lengths, dilation_rates, mode, k.shape[2])
    return backward(dout, q, k, v, out, lse, dlse, plan, causal=causal, scale=scale)


@triton_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, segment_lengths, dilation_rates, mode, causal, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, segment_lengths, dilation_rates, mode, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.pattern = (segment_lengths, dilation_rates, mode, causal, scale)
    # An output no loss reaches gets None, not a materialised zero tensor (no D - 0 pass over the LSE).
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None) -> tuple:
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.dilated_attn.triton_bwd(dout, q, k, v, out, lse, dlse, *ctx.pattern)
    return dq, dk, dv, None, None, None, None, None


triton_fwd.register_autograd(_backward, setup_context=_setup_context)


__all__ = ["DTYPES", "MIN_HEAD_DIM", "MAX_HEAD_DIM", "triton_fwd", "triton_bwd"]
