"""``dilated_attention``: the public functional entry point, and the portable backend behind it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, overload

import torch

from dilated_attn.block_attention import compute_dtype
from dilated_attn.ops import dilated_backward, dilated_forward, jobs_for
from dilated_attn.pattern import DilationPattern, check_mode
from dilated_attn.plan import PatternJob
from dilated_attn.registry import get_registry
from dilated_attn.validation import check_dropout, check_qkv, check_scale


class _DilatedAttention(torch.autograd.Function):
    """Forward through ``dilated_forward``; backward with the merged out and LSE."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        jobs: tuple[PatternJob, ...],
        causal: bool,
        scale: float,
        dropout_p: float,
        key_padding_mask: torch.Tensor | None,
        pool: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0.0 else None
        lease = None
        workspace = None
        if pool is not None:
            lease = pool.acquire(q.shape[:3] + v.shape[3:], compute_dtype(q.dtype), q.device)
            workspace = lease.tensor
        try:
            acc, lse = dilated_forward(
                q,
                k,
                v,
                jobs,
                causal=causal,
                scale=scale,
                dropout_p=dropout_p,
                dropout_seed=seed,
                key_padding_mask=key_padding_mask,
                out=workspace,
            )
            out = acc.to(q.dtype, copy=lease is not None)
        finally:
            if lease is not None:
                pool.release(lease)
        if q.dtype != torch.float64:
            lse = lse.to(torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.jobs, ctx.causal, ctx.scale = jobs, causal, scale
        ctx.dropout_p, ctx.seed, ctx.key_padding_mask = dropout_p, seed, key_padding_mask
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable()
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = dilated_backward(
            dout.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            ctx.jobs,
            causal=ctx.causal,
            scale=ctx.scale,
            dlse=dlse,
            dropout_p=ctx.dropout_p,
            dropout_seed=ctx.seed,
            key_padding_mask=ctx.key_padding_mask,
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


@overload
def sdpa_dilated_attention(
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
    key_padding_mask: torch.Tensor | None = None,
    pool: Any = None,
) -> torch.Tensor: ...


@overload
def sdpa_dilated_attention(
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
    key_padding_mask: torch.Tensor | None = None,
    pool: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def sdpa_dilated_attention(
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
    key_padding_mask: torch.Tensor | None = None,
    pool: Any = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def sdpa_dilated_attention(
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
    key_padding_mask: torch.Tensor | None = None,
    pool: Any = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The portable backend ("sdpa"): gather each head's rows, fused block attention, LSE merge."""
    pattern = DilationPattern.of(segment_lengths, dilation_rates)
    _, n, h, d = q.shape
    scale = check_scale(scale, d)
    jobs = jobs_for(pattern, n, h, mode)
    out, lse = _DilatedAttention.apply(q, k, v, jobs, causal, scale, dropout_p, key_padding_mask, pool)
    return (out, lse) if return_lse else out


@overload
def reference_dilated_attention(
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
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor: ...


@overload
def reference_dilated_attention(
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
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def reference_dilated_attention(
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
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def reference_dilated_attention(
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
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The dense float64 oracle as a backend ("reference"): results cast back to the input dtype."""
    from dilated_attn.reference import dilated_attention_reference

    out, lse = dilated_attention_reference(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        mode=mode,
        causal=causal,
        scale=scale,
        return_lse=True,
        key_padding_mask=key_padding_mask,
    )
    out = out.to(q.dtype)
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


@overload
def dilated_attention(
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
    backend: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
    pool: Any = None,
    **backend_kwargs: Any,
) -> torch.Tensor: ...


@overload
def dilated_attention(
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
    backend: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
    pool: Any = None,
    **backend_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def dilated_attention(
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
    backend: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
    pool: Any = None,
    **backend_kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def dilated_attention(
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
    backend: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
    pool: Any = None,
    **backend_kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact LongNet dilated attention on ``(b, n, h, d)`` tensors.

    Args:
        q, k, v: ``(batch, seq, heads, head_dim)``, one dtype and device.
        segment_lengths, dilation_rates: the pattern (or a ``DilationPattern`` as the first).
        mode: ``"longnet"`` (every head runs every pattern, merged by softmax denominators) or
            ``"head_groups"`` (heads split into one group per pattern).
        causal: queries see only keys at positions ``<=`` their own.
        scale: score scale, default ``head_dim ** -0.5``.
        dropout_p: dropout on attention probabilities (pass 0 outside training).
        return_lse: also return the log-sum-exp ``(b, n, h)`` (float32; ``-inf`` for rows with no key).
        backend: a registered backend name, or ``"auto"`` for the best one that fits the inputs.
        key_padding_mask: ``(b, n)`` bool, True marks keys that are never attended.
        pool: a ``BufferPool`` for workspaces (backends that take one).

    Returns:
        ``out`` ``(b, n, h, d)`` in the input dtype, or ``(out, lse)``.
    """
    check_qkv(q, k, v, key_padding_mask=key_padding_mask)
    pattern = DilationPattern.of(segment_lengths, dilation_rates)
    check_mode(mode)
    dropout_p = check_dropout(dropout_p)
    if scale is not None:
        scale = check_scale(scale, q.shape[-1])
    if not isinstance(backend, str):
        raise TypeError(f"backend={backend!r} must be a backend name (str)")
    registry = get_registry()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if backend == "auto":
        chosen = registry.select(
            device_type=q.device.type,
            dtype=q.dtype,
            mode=mode,
            causal=causal,
            needs_grad=needs_grad,
            key_padding_mask=key_padding_mask is not None,
            dropout=dropout_p > 0.0,
        )
    else:
        chosen = registry.attention(backend)
        why = chosen.capabilities.mismatch(
            device_type=q.device.type, dtype=q.dtype, mode=mode, causal=causal, needs_grad=needs_grad
        )
        if why is not None:
            raise ValueError(f"backend={backend!r} cannot run these inputs: {why}")
        for name in chosen.capabilities.requires:
            if backend_kwargs.get(name) is None:
                raise ValueError(f"backend={backend!r} requires the keyword argument {name}=...")
    if dropout_p > 0.0 and not chosen.capabilities.dropout:
        raise ValueError(f"backend={chosen.name!r} does not support dropout_p={dropout_p} (it must be 0)")
    if key_padding_mask is not None:
        if not chosen.capabilities.key_padding_mask:
            raise ValueError(f"backend={chosen.name!r} does not support key_padding_mask")
        backend_kwargs["key_padding_mask"] = key_padding_mask
    if pool is not None and chosen.capabilities.extra.get("pool", False):
        backend_kwargs["pool"] = pool
    return chosen.fn(
        q,
        k,
        v,
        pattern.segment_lengths,
        pattern.dilation_rates,
        mode=mode,
        causal=causal,
        scale=scale,
        dropout_p=dropout_p,
        return_lse=return_lse,
        **backend_kwargs,
    )
