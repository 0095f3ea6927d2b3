"""``ring_dilated_attention``: exact dilated attention on a sequence split across ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, overload

import torch
import torch.distributed as dist
from dilated_attn.pattern import DilationPattern, check_mode, jobs_for
from dilated_attn.validation import check_qkv, check_scale

from dilated_attn_ring.group import GroupInfo, check_agreement, resolve_group
from dilated_attn_ring.passes import ring_backward, ring_forward
from dilated_attn_ring.plan import RankPlan, rank_plan


class _RingDilatedAttention(torch.autograd.Function):
    """Forward and backward of one rank; both are collective over the group."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        plan: RankPlan,
        info: GroupInfo,
        causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        acc, lse = ring_forward(q, k, v, plan, info, causal=causal, scale=scale)
        out = acc.to(q.dtype)
        if q.dtype != torch.float64:
            lse = lse.to(torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.info, ctx.causal, ctx.scale = plan, info, causal, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dk, dv = ring_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            None if dlse is None else dlse.contiguous(),
            ctx.plan,
            ctx.info,
            causal=ctx.causal,
            scale=ctx.scale,
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


@overload
def ring_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | DilationPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    mode: str = "longnet",
    causal: bool = False,
    scale: float | None = None,
    return_lse: Literal[False] = False,
) -> torch.Tensor: ...


@overload
def ring_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | DilationPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    mode: str = "longnet",
    causal: bool = False,
    scale: float | None = None,
    return_lse: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def ring_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | DilationPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    mode: str = "longnet",
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def ring_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | DilationPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    mode: str = "longnet",
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact dilated attention over a sequence held in equal contiguous chunks by the ranks of ``group``.

    Rank ``r`` of ``group`` (default: the world) passes ``q, k, v`` ``(b, n_local, h, d)`` holding
    global positions ``[r * n_local, (r + 1) * n_local)``; segments, offsets and causality refer to
    the whole sequence of ``world * n_local`` positions. Each rank gets its rows of the single-process
    result (SPEC 1a/1b): ``out`` ``(b, n_local, h, d)`` in the input dtype and, with ``return_lse``,
    ``lse`` ``(b, n_local, h)`` (float32; float64 for float64 inputs). Gradients are exact.

    Forward and backward are collective: every rank must call this function with matching
    arguments, and must backpropagate through its output when any rank does.
    """
    b, n_local, h, _, d = check_qkv(q, k, v, enable_gqa=False)
    pattern = DilationPattern.of(segment_lengths, dilation_rates)
    check_mode(mode)
    if not isinstance(causal, bool):
        raise TypeError(f"causal={causal!r} must be a bool")
    scale = check_scale(scale, d)
    info = resolve_group(group)
    check_agreement(info, q, pattern, mode=mode, causal=causal, scale=scale)
    jobs = jobs_for(pattern, info.world * n_local, h, mode)
    plan = rank_plan(jobs, n_local, info.world, info.rank, causal)
    out, lse = _RingDilatedAttention.apply(q, k, v, plan, info, causal, scale)
    return (out, lse) if return_lse else out
