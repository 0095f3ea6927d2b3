"""``block_sparse_attention``: softmax attention restricted to a sparse pattern, on FlexAttention.

On CUDA, FlexAttention is compiled once per shape (its fused forward and backward kernels skip the
blocks the pattern leaves empty). On CPU it runs eagerly; FlexAttention has no CPU backward, so the
gradients there come from ``dilated_attn.ops.attention_backward`` with the pattern as an additive
``-inf`` bias, given FlexAttention's output and log-sum-exp.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal, cast, overload

import torch
from dilated_attn.block_attention import compute_dtype
from dilated_attn.ops import attention_backward
from dilated_attn.validation import check_qkv, check_scale
from torch.nn.attention.flex_attention import (
    AuxRequest,
    BlockMask,
    FlexKernelOptions,
    create_mask,
    flex_attention,
)

from dilated_attn_sparse.cache import block_masks
from dilated_attn_sparse.compiled import compiled
from dilated_attn_sparse.patterns import SparsePattern
from dilated_attn_sparse.tuning import default_kernel_options
from dilated_attn_sparse.validation import (
    check_block_size,
    check_flag,
    check_kernel_options,
    clamp_block_size,
)

_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _flex_bnhd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float,
    return_lse: bool,
    kernel_options: FlexKernelOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FlexAttention on ``(b, n, h, d)`` tensors: ``out`` ``(b, n, h, d)``, ``lse`` ``(b, n, h)``.

    FlexAttention takes ``(b, h, n, d)``; transposed views cost no copy, and its output keeps the
    query's stride order, so transposing it back gives a contiguous ``(b, n, h, d)`` tensor. Its
    public LSE is natural-log (the kernels' base-2 LSE is rescaled by the frontend), ``-inf`` with
    an output of 0 for rows that allow no key.
    """
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if not return_lse:
        out = flex_attention(qt, kt, vt, block_mask=block_mask, scale=scale, kernel_options=kernel_options)
        return out.transpose(1, 2), None  # type: ignore[union-attr]
    out, aux = flex_attention(
        qt,
        kt,
        vt,
        block_mask=block_mask,
        scale=scale,
        kernel_options=kernel_options,
        return_aux=AuxRequest(lse=True),
    )
    lse = aux.lse
    assert lse is not None
    return out.transpose(1, 2), lse.transpose(1, 2)


class _EagerBlockSparse(torch.autograd.Function):
    """CPU: eager FlexAttention forward; backward by the core block primitive with a ``-inf`` bias."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # FlexAttention refuses CPU inputs that require grad, even under no_grad. Eager is the
        # intended CPU path: its advice to compile is noise here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out, lse = _flex_bnhd(q.detach(), k.detach(), v.detach(), block_mask, scale, True)
        assert lse is not None
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block_mask, ctx.scale = block_mask, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dout: torch.Tensor | None, dlse: torch.Tensor | None) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        block_mask: BlockMask = ctx.block_mask
        if dout is None:
            dout = torch.zeros_like(out)
        # The dense bias takes the block mask's own extents: one sequence at a time when the mask
        # differs per sequence (never more than one sequence's mask held), all at once otherwise.
        mask_batch, mask_heads = block_mask.kv_num_blocks.shape[:2]
        if mask_batch == 1:
            dq, dk, dv = _masked_backward(
                q, k, v, out, lse, dout, dlse, block_mask.mask_mod, mask_heads, ctx.scale
            )
            return dq, dk, dv, None, None
        per_sequence = []
        for i in range(mask_batch):
            rows = slice(i, i + 1)
            per_sequence.append(
                _masked_backward(
                    q[rows],
                    k[rows],
                    v[rows],
                    out[rows],
                    lse[rows],
                    dout[rows],
                    None if dlse is None else dlse[rows],
                    _at_sequence(block_mask.mask_mod, i),
                    mask_heads,
                    ctx.scale,
                )
            )
        dq, dk, dv = (torch.cat(parts) for parts in zip(*per_sequence, strict=True))
        return dq, dk, dv, None, None


def _at_sequence(mask_mod: Callable[..., torch.Tensor], index: int) -> Callable[..., torch.Tensor]:
    """``mask_mod`` with batch index ``b`` read as sequence ``index + b``."""

    def shifted(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return mask_mod(b + index, h, q_idx, kv_idx)

    return shifted


def _masked_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    mask_mod: Callable[..., torch.Tensor],
    mask_heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``(b, n, h, d)`` rows that all take ``mask_mod``'s mask at batch index 0, over
    ``mask_heads`` heads (1: one mask broadcast to every head)."""
    n = q.shape[1]
    allowed = create_mask(mask_mod, 1, mask_heads, n, n, q.device)
    bias = torch.zeros(allowed.shape, dtype=compute_dtype(q.dtype)).masked_fill_(~allowed, float("-inf"))
    dq, dk, dv = attention_backward(
        dout.transpose(1, 2),
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        out.transpose(1, 2),
        lse.transpose(1, 2),
        causal=False,
        scale=scale,
        bias=bias,
        dlse=None if dlse is None else dlse.transpose(1, 2),
    )
    return dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)


@overload
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsePattern,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_size: int = 128,
    return_lse: Literal[False] = False,
    kernel_options: Mapping[str, Any] | None = None,
) -> torch.Tensor: ...


@overload
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsePattern,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_size: int = 128,
    return_lse: Literal[True],
    kernel_options: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsePattern,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_size: int = 128,
    return_lse: bool = False,
    kernel_options: Mapping[str, Any] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SparsePattern,
    *,
    causal: bool = False,
    scale: float | None = None,
    block_size: int = 128,
    return_lse: bool = False,
    kernel_options: Mapping[str, Any] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the keys ``pattern`` allows, one softmax per row.

    Args:
        q, k, v: ``(batch, seq, heads, head_dim)``, one shape, dtype and device (any ``seq``).
        pattern: a :class:`SparsePattern`, e.g. ``local_window(256) | dilated_blocks(16, 4)``.
        causal: a bool: also forbid keys after the query.
        scale: score scale, default ``head_dim ** -0.5``.
        block_size: FlexAttention's block (a power of 2): the granularity at which empty blocks
            are skipped. One covering the whole sequence (rounded up to a power of 2, at least
            128) is the largest used: a larger one would only cost memory.
        return_lse: also return the natural-log log-sum-exp ``(b, n, h)`` float32.
        kernel_options: FlexAttention's kernel tuning (``FlexKernelOptions``, keys optionally
            prefixed ``fwd_``/``bwd_``, e.g. ``{"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64}``), checked on
            every device and used by the compiled CUDA kernels (the CPU path has no tiles to tune).
            When omitted, Hopper GPUs get the tiles measured fastest there
            (:func:`.tuning.default_kernel_options`); given options replace those entirely.

    Returns:
        ``out`` ``(b, n, h, d)`` in the input dtype (rows allowing no key give 0, and ``lse = -inf``),
        or ``(out, lse)``. Differentiable in ``q, k, v``, including through ``lse``.

    The pattern's ``BlockMask`` is built on first use and cached (:data:`.cache.block_masks`), once
    for the whole batch unless the pattern's predicate reads the batch index.
    """
    b, n, h, _, d = check_qkv(q, k, v, enable_gqa=False)
    if not isinstance(pattern, SparsePattern):
        raise TypeError(
            f"pattern={pattern!r} must be a SparsePattern (e.g. dilated_attn_sparse.local_window(256))"
        )
    causal = check_flag("causal", causal)
    scale = check_scale(scale, d)
    block_size = clamp_block_size(check_block_size(block_size), n)
    return_lse = check_flag("return_lse", return_lse)
    given_options = check_kernel_options(kernel_options)
    device = q.device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"q.device={device} must be a CPU or CUDA device")
    if device.type == "cuda" and q.dtype not in _CUDA_DTYPES:
        raise TypeError(f"q.dtype={q.dtype} must be one of {_CUDA_DTYPES} on CUDA")
    block_mask = block_masks.get(pattern, n, h, batch=b, block_size=block_size, causal=causal, device=device)
    if device.type == "cuda":
        chosen = given_options or default_kernel_options(block_mask, q, block_size)
        options = cast(FlexKernelOptions, chosen) if chosen else None
        key = ("flex", tuple(q.shape), q.dtype, device, return_lse, tuple(sorted((options or {}).items())))
        out, lse = compiled(_flex_bnhd, key)(q, k, v, block_mask, scale, return_lse, options)
    else:
        out, lse = _EagerBlockSparse.apply(q, k, v, block_mask, scale)
    if not return_lse:
        return out
    return out, lse.contiguous()
