"""The fused kernels as PyTorch operators (the "triton" backend in ``dilated_attn.backends.triton`` calls them).

``dilated_attn::triton_fwd`` and ``dilated_attn::triton_bwd`` are ``torch.library`` custom ops with
fake (meta) implementations and registered autograd, so autograd, ``torch.compile(fullgraph=True)``
and CUDA graph capture see single opaque ops. Autotuning runs on the first call per head_dim, dtype and
causal flag: make that call before capturing a graph.
"""

# No `from __future__ import annotations`: torch.library reads the real annotations to infer schemas.
import contextlib
from typing import Any, Optional

import torch

from dilated_attn.kernels.backward import backward
from dilated_attn.kernels.forward import forward_launch
from dilated_attn.kernels.launches import plan_launches

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256


def _device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _new_outputs(q: torch.Tensor, needs_init: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` like ``q`` and ``lse`` ``(b, n, h)`` float32; zeroed (``-inf``) when rows may stay unwritten."""
    b, n, h, _ = q.shape
    if needs_init:
        return torch.zeros_like(q), torch.full((b, n, h), float("-inf"), dtype=torch.float32, device=q.device)
    return torch.empty_like(q), torch.empty((b, n, h), dtype=torch.float32, device=q.device)


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
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _, n, h, _ = q.shape
    plan = plan_launches(n, h, segment_lengths, dilation_rates, mode, k.shape[2])
    out, lse = _new_outputs(q, plan.needs_init)
    with _device_guard(q):
        for launch in plan.launches:
            forward_launch(q, k, v, out, lse, launch, causal=causal, scale=scale)
    return out, lse


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
    dout, q, k, v, out, lse = (t.contiguous() for t in (dout, q, k, v, out, lse))
    _, n, h, _ = q.shape
    plan = plan_launches(n, h, segment_lengths, dilation_rates, mode, k.shape[2])
    with _device_guard(q):
        return backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            None if dlse is None else dlse.contiguous(),
            plan,
            causal=causal,
            scale=scale,
        )


@triton_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, segment_lengths, dilation_rates, mode, causal, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, segment_lengths, dilation_rates, mode, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.pattern = (segment_lengths, dilation_rates, mode, causal, scale)


def _backward(ctx: Any, dout: torch.Tensor, dlse: torch.Tensor | None) -> tuple:
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.dilated_attn.triton_bwd(dout, q, k, v, out, lse, dlse, *ctx.pattern)
    return dq, dk, dv, None, None, None, None, None


triton_fwd.register_autograd(_backward, setup_context=_setup_context)


__all__ = ["DTYPES", "MIN_HEAD_DIM", "MAX_HEAD_DIM", "triton_fwd", "triton_bwd"]
