"""The portable "sdpa" backend: gather each head's rows, fused block attention with LSE, exact merge.

The forward and backward are ``torch.library`` custom ops (``dilated_attn::sdpa_fwd``/``sdpa_bwd``)
with fake implementations, so ``torch.compile(fullgraph=True)`` sees two opaque ops and never traces
the plan caches behind them.
"""

# No `from __future__ import annotations`: torch.library reads the real annotations to infer schemas.
import itertools
import weakref
from typing import Any, Optional

import torch

from dilated_attn.block_attention import compute_dtype
from dilated_attn.ops import dilated_backward, dilated_forward
from dilated_attn.pattern import DilationPattern, jobs_for
from dilated_attn.request import Request

# Pools cannot cross the custom-op boundary: they travel as handles into this table.
_pools: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_handles: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
_next_handle = itertools.count(1)


def _pool_handle(pool: Any) -> int:
    if pool is None:
        return 0
    handle = _handles.get(pool)
    if handle is None:
        handle = next(_next_handle)
        _handles[pool] = handle
        _pools[handle] = pool
    return handle


def _jobs(n: int, h: int, segment_lengths: list[int], dilation_rates: list[int], mode: str) -> tuple:
    return jobs_for(DilationPattern.trusted(segment_lengths, dilation_rates), n, h, mode)


@torch.library.custom_op("dilated_attn::sdpa_fwd", mutates_args=())
def sdpa_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: list[int],
    dilation_rates: list[int],
    mode: str,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],  # noqa: UP045 (the schema inference reads typing.Optional)
    key_padding_mask: Optional[torch.Tensor],  # noqa: UP045
    pool: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged attention of every pattern: ``out`` (input dtype) and ``lse`` ``(b, n, h)``."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _, n, h, _ = q.shape
    jobs = _jobs(n, h, segment_lengths, dilation_rates, mode)
    buffers = _pools.get(pool) if pool else None
    lease = None
    if buffers is not None:
        lease = buffers.acquire(q.shape[:3] + v.shape[3:], compute_dtype(q.dtype), q.device)
    try:
        acc, lse = dilated_forward(
            q,
            k,
            v,
            jobs,
            causal=causal,
            scale=scale,
            dropout_p=dropout_p,
            dropout_seed=None if seed is None else int(seed.item()),
            key_padding_mask=key_padding_mask,
            out=None if lease is None else lease.tensor,
        )
        out = acc.to(q.dtype, copy=lease is not None)
    finally:
        if lease is not None and buffers is not None:
            buffers.release(lease)
    return out, lse.to(compute_dtype(q.dtype))


@sdpa_fwd.register_fake
def _(q, k, v, segment_lengths, dilation_rates, mode, causal, scale, dropout_p, seed, key_padding_mask, pool):
    b, n, h, _ = q.shape
    out = torch.empty((b, n, h, v.shape[-1]), dtype=q.dtype, device=q.device)
    return out, q.new_empty((b, n, h), dtype=compute_dtype(q.dtype))


@torch.library.custom_op("dilated_attn::sdpa_bwd", mutates_args=())
def sdpa_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: Optional[torch.Tensor],  # noqa: UP045
    segment_lengths: list[int],
    dilation_rates: list[int],
    mode: str,
    causal: bool,
    scale: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],  # noqa: UP045
    key_padding_mask: Optional[torch.Tensor],  # noqa: UP045
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` from the merged ``out`` and ``lse`` of the forward."""
    _, n, h, _ = q.shape
    dq, dk, dv = dilated_backward(
        dout.contiguous(),
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        out.contiguous(),
        lse.contiguous(),
        _jobs(n, h, segment_lengths, dilation_rates, mode),
        causal=causal,
        scale=scale,
        dlse=None if dlse is None else dlse.contiguous(),
        dropout_p=dropout_p,
        dropout_seed=None if seed is None else int(seed.item()),
        key_padding_mask=key_padding_mask,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@sdpa_bwd.register_fake
def _(
    dout,
    q,
    k,
    v,
    out,
    lse,
    dlse,
    segment_lengths,
    dilation_rates,
    mode,
    causal,
    scale,
    dropout_p,
    seed,
    key_padding_mask,
):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, segment_lengths, dilation_rates, mode, causal, scale, dropout_p, seed, mask, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed, mask)
    ctx.args = (segment_lengths, dilation_rates, mode, causal, scale, dropout_p)
    # An output no loss reaches gets None, not zeros: a zero ``dlse`` would still count as a gradient
    # into the LSE, which the fused SDPA kernels do not take, and send every block to the math path.
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, dout: Optional[torch.Tensor], dlse: Optional[torch.Tensor]) -> tuple:  # noqa: UP045
    q, k, v, out, lse, seed, mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    segment_lengths, dilation_rates, mode, causal, scale, dropout_p = ctx.args
    dq, dk, dv = torch.ops.dilated_attn.sdpa_bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        dlse,
        segment_lengths,
        dilation_rates,
        mode,
        causal,
        scale,
        dropout_p,
        seed,
        mask,
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


sdpa_fwd.register_autograd(_backward, setup_context=_setup_context)


def sdpa_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: DilationPattern, request: Request
) -> tuple[torch.Tensor, torch.Tensor]:
    """The "sdpa" backend (see the module docstring)."""
    seed = None
    if request.dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    return torch.ops.dilated_attn.sdpa_fwd(
        q,
        k,
        v,
        list(pattern.segment_lengths),
        list(pattern.dilation_rates),
        request.mode,
        request.causal,
        request.scale,
        request.dropout_p,
        seed,
        request.key_padding_mask,
        _pool_handle(request.pool),
    )
