"""``dilated_attention``: the front door. It checks every argument once, builds the pattern and a
frozen :class:`~dilated_attn.request.Request`, asks the registry for a backend and calls it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

import torch

from dilated_attn.pattern import DilationPattern, check_mode
from dilated_attn.registry import AttentionBackend, get_registry
from dilated_attn.request import Request
from dilated_attn.validation import (
    attn_mask_as_padding,
    check_bool,
    check_causal,
    check_dropout,
    check_key_padding_mask,
    check_pool,
    check_qkv,
    check_scale,
)

LSE_LAYOUTS = ("bnh", "bhn")


def build_request(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mode: object = "longnet",
    causal: object = None,
    is_causal: object = None,
    scale: object = None,
    dropout_p: object = 0.0,
    key_padding_mask: object = None,
    attn_mask: object = None,
    enable_gqa: object = None,
    pool: object = None,
    options: Mapping[str, Any] | None = None,
) -> Request:
    """Check the arguments of one call and freeze them into a :class:`Request` (composers use this too)."""
    b, n, h, h_kv, d = check_qkv(q, k, v, enable_gqa=enable_gqa)
    padding = check_key_padding_mask(key_padding_mask, b, n, q.device)
    dropped = attn_mask_as_padding(attn_mask, b, n, q.device)
    if dropped is not None:
        padding = dropped if padding is None else padding | dropped
    return Request(
        device=q.device,
        dtype=q.dtype,
        batch=b,
        seq_len=n,
        num_heads=h,
        num_kv_heads=h_kv,
        head_dim=d,
        mode=check_mode(mode),
        causal=check_causal(causal, is_causal),
        scale=check_scale(scale, d),
        dropout_p=check_dropout(dropout_p),
        key_padding_mask=padding,
        needs_grad=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
        pool=check_pool(pool),
        options=dict(options or {}),
    )


def choose_backend(backend: object, request: Request) -> AttentionBackend:
    """The backend named ``backend`` (checked against the request), or the best fit for ``"auto"``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend={backend!r} must be a backend name (str)")
    registry = get_registry()
    if backend == "auto":
        if request.options:
            takers = sorted(
                name
                for name, b in registry.backends().items()
                if set(request.options) <= set(b.capabilities.options)
            )
            raise TypeError(
                f"dilated_attention() got unexpected keyword arguments {sorted(request.options)}; "
                + (
                    f"they are options of backend(s) {takers}: pass backend=..."
                    if takers
                    else "no backend takes them"
                )
            )
        return registry.select(request)
    chosen = registry.attention(backend)
    caps = chosen.capabilities
    unknown = sorted(set(request.options) - set(caps.options))
    if unknown:
        raise TypeError(
            f"dilated_attention(backend={backend!r}) got unexpected keyword arguments {unknown}; "
            f"it takes {sorted(caps.options) or 'none'}"
        )
    why = caps.mismatch(request)
    if why is not None:
        raise ValueError(f"backend={backend!r} cannot run these inputs: {why}")
    return chosen


def run_backend(
    chosen: AttentionBackend,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: DilationPattern,
    request: Request,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Call ``chosen``, repeating grouped K/V heads first for a backend that does not take them."""
    if request.num_kv_heads != request.num_heads and not chosen.capabilities.gqa:
        repeat = request.num_heads // request.num_kv_heads
        k = k.repeat_interleave(repeat, dim=2)
        v = v.repeat_interleave(repeat, dim=2)
        request = request.replace(num_kv_heads=request.num_heads)
    return chosen.fn(q, k, v, pattern, request)


@overload
def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | DilationPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    mode: str = "longnet",
    causal: bool | None = None,
    is_causal: bool | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: Literal[False] = False,
    lse_layout: str = "bnh",
    backend: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    enable_gqa: bool | None = None,
    pool: Any = None,
    **options: Any,
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
    causal: bool | None = None,
    is_causal: bool | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: Literal[True],
    lse_layout: str = "bnh",
    backend: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    enable_gqa: bool | None = None,
    pool: Any = None,
    **options: Any,
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
    causal: bool | None = None,
    is_causal: bool | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    lse_layout: str = "bnh",
    backend: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    enable_gqa: bool | None = None,
    pool: Any = None,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | DilationPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    mode: str = "longnet",
    causal: bool | None = None,
    is_causal: bool | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    lse_layout: str = "bnh",
    backend: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    enable_gqa: bool | None = None,
    pool: Any = None,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact LongNet dilated attention on ``(b, n, h, d)`` tensors.

    Args:
        q: ``(batch, seq, heads, head_dim)``.
        k, v: ``(batch, seq, kv_heads, head_dim)``, the dtype and device of ``q``; ``kv_heads`` divides
            ``heads`` (grouped-query attention: query head ``j`` reads K/V head ``j // (heads / kv_heads)``,
            its dilation offset stays ``j mod r``).
        segment_lengths, dilation_rates: the pattern (or a ``DilationPattern`` as the first).
        mode: ``"longnet"`` (every head runs every pattern, merged by softmax denominators) or
            ``"head_groups"`` (heads split into one group per pattern).
        causal, is_causal: one flag under two names (``is_causal`` is PyTorch's): queries see only keys
            at positions ``<=`` their own. Default False; both may be given only if equal.
        scale: score scale, default ``head_dim ** -0.5``.
        dropout_p: dropout on attention probabilities (pass 0 outside training).
        return_lse: also return the log-sum-exp (float32, float64 for float64 inputs; ``-inf`` on rows
            with no key).
        lse_layout: ``"bnh"`` (``(b, n, h)``, the layout of ``out`` without ``d``) or ``"bhn"``
            (``(b, h, n)``, flash-attn's and FlexAttention's).
        backend: a registered backend name, or ``"auto"`` for the highest-priority one that runs
            these inputs.
        key_padding_mask: ``(b, n)`` bool, True marks keys that are never attended.
        attn_mask: PyTorch's boolean mask (True = may attend), accepted when it drops whole keys:
            ``(b, n)``, ``(b, 1, 1, n)`` or ``(1, 1, 1, n)``; anything else is refused.
        enable_gqa: PyTorch's flag; ``None`` infers grouped-query attention from the shapes, ``False``
            demands equal head counts.
        pool: a ``BufferPool`` for workspaces (backends with the ``pool`` capability).
        **options: keyword arguments of the named backend (``group=`` for "ring", ``pattern=`` for
            "block_sparse"); unknown ones are a ``TypeError``.

    Returns:
        ``out`` ``(b, n, h, d)`` in the input dtype, or ``(out, lse)``.
    """
    pattern = DilationPattern.of(segment_lengths, dilation_rates)
    return_lse = check_bool("return_lse", return_lse)
    if lse_layout not in LSE_LAYOUTS:
        raise ValueError(f"lse_layout={lse_layout!r} must be one of {LSE_LAYOUTS}")
    request = build_request(
        q,
        k,
        v,
        mode=mode,
        causal=causal,
        is_causal=is_causal,
        scale=scale,
        dropout_p=dropout_p,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        enable_gqa=enable_gqa,
        pool=pool,
        options=options,
    )
    out, lse = run_backend(choose_backend(backend, request), q, k, v, pattern, request)
    if not return_lse:
        return out
    return out, (lse.transpose(1, 2).contiguous() if lse_layout == "bhn" else lse)
