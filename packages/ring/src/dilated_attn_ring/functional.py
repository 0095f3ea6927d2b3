"""``ring_dilated_attention``: exact dilated attention on a sequence split across ranks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
from dilated_attn.pattern import DilationPattern, check_mode, jobs_for
from dilated_attn.validation import check_qkv, check_scale

from dilated_attn_ring.group import GroupInfo, agree, call_fields, check_device, resolve_group
from dilated_attn_ring.passes import ring_backward, ring_forward
from dilated_attn_ring.plan import RankPlan, rank_plan

if TYPE_CHECKING:
    from dilated_attn_ring.group import GroupSpec


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
    group: GroupSpec = None,
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
    group: GroupSpec = None,
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
    group: GroupSpec = None,
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
    group: GroupSpec = None,
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

    ``group`` names the ranks the sequence is split across, as PyTorch's distributed APIs do: a
    ``ProcessGroup``, a 1-D ``DeviceMesh`` (``mesh["sp"]`` of a data-parallel x sequence-parallel
    mesh), or a ``(mesh, dim)`` pair with ``dim`` a dimension name or index of ``mesh``; ``None`` is
    the default group. Anything else is a ``TypeError``.

    Forward and backward are collective: every rank must call this function with matching
    arguments, and must backpropagate through its output when any rank does. Arguments are checked
    on every rank, then agreed on before any transfer: when one rank's arguments are invalid or
    differ from the others', every rank raises the same error naming the ranks at fault, rather
    than the others waiting for it until the process group's timeout.
    """
    # Checks a rank can fail alone run first, their error held back: the agreement below raises it
    # on every rank together, so no rank waits in a transfer for a rank that has given up.
    fields: tuple[int, ...] | None = None
    error: ValueError | TypeError | None = None
    try:
        _, n_local, h, _, d = check_qkv(q, k, v, enable_gqa=False)
        pattern = DilationPattern.of(segment_lengths, dilation_rates)
        check_mode(mode)
        if not isinstance(causal, bool):
            raise TypeError(f"causal={causal!r} must be a bool (got {type(causal).__name__})")
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse={return_lse!r} must be a bool (got {type(return_lse).__name__})")
        scale = check_scale(scale, d)
        fields = call_fields(q, pattern, mode=mode, causal=causal, scale=scale)
    except (TypeError, ValueError) as exc:
        error = exc
    try:
        info = resolve_group(group)
    except (TypeError, ValueError):
        # Without a group there is nobody to agree with: the call's own error says more.
        if error is not None:
            raise error from None
        raise
    if error is None:
        try:
            check_device(info, q)
        except ValueError as exc:
            error, fields = exc, None
    agree(info, fields, error)
    assert scale is not None
    jobs = jobs_for(pattern, info.world * n_local, h, mode)
    plan = rank_plan(jobs, n_local, info.world, info.rank, causal)
    out, lse = _RingDilatedAttention.apply(q, k, v, plan, info, causal, scale)
    return (out, lse) if return_lse else out
