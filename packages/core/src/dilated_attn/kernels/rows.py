"""Row writes around the attention kernels: library results into strided views, and the rows no launch selects.

``scatter_into`` copies (or adds) a library call's ``(B, S, hc, d)`` results into the call's strided
views of the outputs or gradients in one Triton launch for up to three tensors. torch's ``copy_`` and
``add_`` on such views take a generic element-wise kernel; here each program moves whole 16-bit rows,
read along the source's rows and written ``d`` elements at a time.

``zero_uncovered`` starts outputs whose plan leaves rows unwritten: where every head has exactly one
launch (``covered_once``: ``head_groups``, and any plan whose launches never merge), a row ``i`` of
head ``j`` in a launch ``(W, r)`` is written by the launch exactly when ``(i mod W) mod r == j mod r``
(a short last segment starts at a multiple of ``W``), so only the other rows need a zero instead of a
memset of the whole tensor before the launches overwrite part of it. H200, ``head_groups`` at
``longnet-1m`` (16 heads, d = 64): 1.23 ms for dQ, dK, dV against 1.93 ms of memsets. The log-sum-exp
(4 bytes a row, rows one head apart) is filled whole: row by row it measured slower than a memset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from dilated_attn.kernels.launches import Launch
from dilated_attn.kernels.tuning import head_dim_pad


@triton.jit
def row_tile(row_blocks, heads, head0, BLOCK: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """(batch, head, rows, columns) of this program's ``BLOCK`` rows of one head on a 1-D grid of
    ``batch * heads * row_blocks`` programs (heads counted from ``head0``), indices in int64."""
    pid = tl.program_id(0)
    bh = pid // row_blocks
    r = (pid % row_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return (bh // heads).to(tl.int64), (bh % heads + head0).to(tl.int64), r, tl.arange(0, HEAD_DIM_PAD)


@triton.jit
def _scatter_kernel(
    S0,
    D0,
    S1,
    D1,
    S2,
    D2,
    rows,
    heads,
    row_blocks,
    s_b,
    s_s,
    s_h,
    d_b,
    d_s,
    d_h,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    COUNT: tl.constexpr,
    ACC0: tl.constexpr,
    ACC1: tl.constexpr,
    ACC2: tl.constexpr,
):
    bb, hh, r, c = row_tile(row_blocks, heads, 0, BLOCK, HEAD_DIM_PAD)
    mask = (r < rows)[:, None] & (c < HEAD_DIM)[None, :]
    src = bb * s_b + hh * s_h + r[:, None] * s_s + c[None, :]
    dst = bb * d_b + hh * d_h + r[:, None] * d_s + c[None, :]
    _move(S0, D0, src, dst, mask, ACC0)
    if COUNT > 1:
        _move(S1, D1, src, dst, mask, ACC1)
    if COUNT > 2:
        _move(S2, D2, src, dst, mask, ACC2)


@triton.jit
def _move(S, D, src, dst, mask, ACCUMULATE: tl.constexpr):
    x = tl.load(S + src, mask=mask, other=0.0)
    if ACCUMULATE:
        x = tl.load(D + dst, mask=mask, other=0.0).to(tl.float32) + x.to(tl.float32)
    tl.store(D + dst, x.to(D.dtype.element_ty), mask=mask)


# Rows per program at head sizes up to 64 (half above), and warps, of the scatter and the zeroing.
ROWS_TILE = (64, 4)


def _rows_block(d: int) -> int:
    return ROWS_TILE[0] // 2 if d > 64 else ROWS_TILE[0]


def scatter_into(
    targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], accumulate: Sequence[bool]
) -> None:
    """``target += source`` (``accumulate``) or ``target = source`` for each pair, all ``(B, S, hc, d)``
    with a unit last stride; targets in any dtype (the sum is formed in float32 and rounded once, as
    torch's ``add_`` does). Pairs whose targets share shape and strides, and whose sources share
    strides, go in one launch."""
    pairs = list(zip(targets, sources, accumulate, strict=True))
    while pairs:
        t0, s0 = pairs[0][0], pairs[0][1]
        group = [
            p
            for p in pairs
            if p[0].shape == t0.shape and p[0].stride() == t0.stride() and p[1].stride() == s0.stride()
        ][:3]
        pairs = [p for p in pairs if not any(p is g for g in group)]
        _scatter(group)


def _scatter(group: list[tuple[torch.Tensor, torch.Tensor, bool]]) -> None:
    target, source = group[0][0], group[0][1]
    batch, rows, heads, d = target.shape
    if not batch * rows * heads * d:
        return
    for t, s, _ in group:
        if t.shape != target.shape or s.shape != target.shape:
            raise ValueError(
                f"target {tuple(t.shape)} and source {tuple(s.shape)} must match {tuple(target.shape)}"
            )
        if t.stride(-1) != 1 or s.stride(-1) != 1:
            raise ValueError("targets and sources need a unit stride along the last dimension")
    padded = group + [group[0]] * (3 - len(group))
    block = _rows_block(d)
    row_blocks = triton.cdiv(rows, block)
    flags = [acc for _, _, acc in padded]
    _scatter_kernel[(batch * heads * row_blocks,)](
        padded[0][1], padded[0][0], padded[1][1], padded[1][0], padded[2][1], padded[2][0],
        rows, heads, row_blocks,
        source.stride(0), source.stride(1), source.stride(2),
        target.stride(0), target.stride(1), target.stride(2),
        HEAD_DIM=d, HEAD_DIM_PAD=head_dim_pad(d), BLOCK=block, COUNT=len(group),
        ACC0=flags[0], ACC1=flags[1], ACC2=flags[2], num_warps=ROWS_TILE[1],
    )  # fmt: skip


@triton.jit
def _zero_rows_kernel(
    T0,
    T1,
    T2,
    n,
    segment,
    dilation,
    head0,
    heads,
    row_blocks,
    t_b,
    t_s,
    t_h,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    COUNT: tl.constexpr,
):
    bb, hh, r, c = row_tile(row_blocks, heads, head0, BLOCK, HEAD_DIM_PAD)
    # Rows the launch does not select for this head: the ones to zero.
    rmask = (r < n) & ((r % segment) % dilation != hh % dilation)
    mask = rmask[:, None] & (c < HEAD_DIM)[None, :]
    offs = bb * t_b + hh * t_h + r[:, None] * t_s + c[None, :]
    zero = tl.zeros((BLOCK, HEAD_DIM_PAD), dtype=tl.float32)
    tl.store(T0 + offs, zero.to(T0.dtype.element_ty), mask=mask)
    if COUNT > 1:
        tl.store(T1 + offs, zero.to(T1.dtype.element_ty), mask=mask)
    if COUNT > 2:
        tl.store(T2 + offs, zero.to(T2.dtype.element_ty), mask=mask)


def covered_once(launches: Sequence[Launch], num_heads: int) -> bool:
    """Whether each of ``num_heads`` heads is in exactly one launch (so ``zero_uncovered`` applies)."""
    seen = [0] * num_heads
    for launch in launches:
        for j in range(launch.head0, launch.head0 + launch.num_heads):
            if not 0 <= j < num_heads:
                return False
            seen[j] += 1
    return all(count == 1 for count in seen)


def zero_uncovered(
    tensors: Sequence[torch.Tensor], launches: Sequence[Launch], *, stats: torch.Tensor | None = None
) -> None:
    """Write 0 into every ``(b, n, h, d)`` tensor (at most three, same strides, unit last stride) at
    the rows of each head its launch does not select, leaving the rows it selects as they are (the
    launches write them), and ``-inf`` into all of ``stats`` ``(b, n, h)`` (the launches overwrite
    theirs). The launches must cover each head once (``covered_once``)."""
    if not tensors or len(tensors) > 3:
        raise ValueError(f"zero_uncovered takes one to three tensors, got {len(tensors)}")
    first = tensors[0]
    for t in tensors:
        if t.shape != first.shape or t.stride() != first.stride() or t.stride(-1) != 1:
            raise ValueError(
                "zero_uncovered's tensors need one shape and one set of strides, unit last stride"
            )
    b, n, h, d = first.shape
    if not covered_once(launches, h):
        raise ValueError("zero_uncovered needs launches that cover each head exactly once")
    padded = list(tensors) + [first] * (3 - len(tensors))
    block = _rows_block(d)
    row_blocks = triton.cdiv(n, block)
    for launch in launches:
        if launch.dilation == 1 or not b * n:
            continue  # every row of its heads is selected
        _zero_rows_kernel[(b * launch.num_heads * row_blocks,)](
            padded[0], padded[1], padded[2],
            n, launch.segment, launch.dilation, launch.head0, launch.num_heads, row_blocks,
            first.stride(0), first.stride(1), first.stride(2),
            HEAD_DIM=d, HEAD_DIM_PAD=head_dim_pad(d), BLOCK=block, COUNT=len(tensors), num_warps=ROWS_TILE[1],
        )  # fmt: skip
    if stats is not None:
        # A whole fill: the rows' 4-byte values one head apart would each take a sector of their own.
        stats.fill_(float("-inf"))


def start_zeroed(
    tensors: Sequence[torch.Tensor], launches: Sequence[Launch], *, stats: torch.Tensor | None = None
) -> None:
    """Zero ``tensors`` (and ``-inf`` in ``stats``) where ``launches`` leave rows unwritten: only the rows
    no launch selects when each head has one launch (``covered_once``), else everything. Each tensor's
    heads must be the launches' heads (not shared K/V heads of a group)."""
    if tensors and covered_once(launches, tensors[0].shape[2]):
        zero_uncovered(tensors, launches, stats=stats)
        return
    for t in tensors:
        t.zero_()
    if stats is not None:
        stats.fill_(float("-inf"))
