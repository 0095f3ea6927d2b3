"""The fused kernels as PyTorch operators, and the "triton" attention backend on top of them.

``dilated_attn::triton_fwd`` and ``dilated_attn::triton_bwd`` are ``torch.library`` custom ops with
fake (meta) implementations and registered autograd, so autograd, ``torch.compile(fullgraph=True)``
and CUDA graph capture see single opaque ops. Autotuning runs on the first call per head_dim, dtype and
causal flag: make that call before capturing a graph.
"""

# No `from __future__ import annotations`: torch.library reads the real annotations to infer schemas.
import contextlib
from collections.abc import Sequence
from typing import Any, Literal, Optional, overload

import torch

from dilated_attn.kernels.backward import backward_launch, compute_delta
from dilated_attn.kernels.forward import forward_launch
from dilated_attn.kernels.launches import plan_launches
from dilated_attn.kernels.tuning import interpreting
from dilated_attn.pattern import DilationPattern, check_mode
from dilated_attn.validation import check_qkv, check_scale

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
    """Dilated attention of ``(b, n, h, d)`` inputs: ``out`` (input dtype) and ``lse`` ``(b, n, h)`` float32."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _, n, h, _ = q.shape
    plan = plan_launches(n, h, segment_lengths, dilation_rates, mode)
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
    """Gradients ``(dq, dk, dv)`` (input dtype) from the merged ``out`` and ``lse`` of the forward."""
    dout, q, k, v, out, lse = (t.contiguous() for t in (dout, q, k, v, out, lse))
    _, n, h, _ = q.shape
    plan = plan_launches(n, h, segment_lengths, dilation_rates, mode)
    make = torch.zeros_like if plan.needs_init else torch.empty_like
    dq, dk, dv = make(q), make(k), make(v)
    with _device_guard(q):
        delta = compute_delta(out, dout, None if dlse is None else dlse.contiguous())
        for launch in plan.launches:
            backward_launch(dout, q, k, v, lse, delta, dq, dk, dv, launch, causal=causal, scale=scale)
    return dq, dk, dv


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


def _check_inputs(q: torch.Tensor, dropout_p: float, backend_kwargs: dict) -> None:
    if backend_kwargs:
        raise TypeError(
            f"backend='triton' got unsupported keyword arguments {sorted(backend_kwargs)}; it takes none"
        )
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p} is not supported by backend='triton' (it must be 0)")
    if q.dtype not in DTYPES:
        raise TypeError(f"q.dtype={q.dtype} is not supported by backend='triton'; it runs {DTYPES}")
    d = q.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"head_dim={d} is not supported by backend='triton'; it must be in "
            f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
        )
    if not (q.is_cuda or interpreting()):
        raise ValueError(
            f"q.device={q.device} is not supported by backend='triton'; it needs CUDA tensors "
            "(or TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"
        )


@overload
def triton_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | DilationPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    mode: str = "longnet",
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: Literal[False] = False,
    **backend_kwargs: Any,
) -> torch.Tensor: ...


@overload
def triton_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | DilationPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    mode: str = "longnet",
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: Literal[True],
    **backend_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def triton_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | DilationPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    mode: str = "longnet",
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    **backend_kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def triton_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | DilationPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    mode: str = "longnet",
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    **backend_kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention of ``(b, n, h, d)`` tensors through the fused Triton kernels.

    Returns ``out`` ``(b, n, h, d)`` in the input dtype, or ``(out, lse)`` with ``lse`` ``(b, n, h)``
    float32 (``-inf`` on rows with no key). Differentiable in ``q, k, v`` (also through ``lse``).
    """
    check_qkv(q, k, v)
    _check_inputs(q, dropout_p, backend_kwargs)
    pattern = DilationPattern.of(segment_lengths, dilation_rates)
    check_mode(mode)
    scale = check_scale(scale, q.shape[-1])
    out, lse = torch.ops.dilated_attn.triton_fwd(
        q, k, v, list(pattern.segment_lengths), list(pattern.dilation_rates), mode, bool(causal), scale
    )
    return (out, lse) if return_lse else out


__all__ = ["DTYPES", "triton_dilated_attention", "triton_fwd", "triton_bwd"]
