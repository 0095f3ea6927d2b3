"""Backward kernels: one pattern's gradients from the merged output and log-sum-exp.

With the merged ``lse`` ``L``, a pattern's probabilities are ``P = exp(s - L)`` and its score
gradients ``dS = P * (dO.V - D)`` with ``D = rowsum(dO * O) - dlse`` computed once for all patterns,
so each pattern's contribution is independent of the others and is added into ``dq, dk, dv``.
Per pattern two kernels run on the same strided rows as the forward: one program per key block for
``dK, dV`` (looping over query blocks) and one per query block for ``dQ`` (looping over key blocks),
which recomputes ``P`` (a fixed summation order: bitwise reproducible). Optionally
(``DILATED_ATTN_TRITON_DQ=atomic``, see ``dq_mode``) the dK/dV kernel also adds ``dS K`` into a float32
dQ accumulator with Hopper's bulk reductions and no dQ kernel runs.

With grouped-query attention the ``g = h / h_kv`` query heads of a K/V head add into its ``dK, dV``;
those with the same offset ``j % r`` select the same key rows, those with different offsets disjoint
ones. The dK/dV program of the first head of each offset class in a group loops over the heads of its
class (``j, j + r, ...``) and the rest exit: each dK/dV row still has one writer, summing in a fixed
order, with no fp32 ``(b, n, h, d)`` buffer and no atomics.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from dilated_attn.kernels.geometry import (
    LOG2E,
    kv_rows,
    load_row_tiles,
    program_coords,
    row_geometry,
    row_source,
)
from dilated_attn.kernels.launches import Launch, LaunchPlan
from dilated_attn.kernels.rows import start_zeroed
from dilated_attn.kernels.segments import backward_launch as segment_backward_launch
from dilated_attn.kernels.segments import segment_engine
from dilated_attn.kernels.tuning import (
    TMA_ENV,
    configs_for,
    device_guard,
    dot_precision,
    head_dim_pad,
    install_scratch_allocator,
    interpreting,
    pruner,
    tma_eligible,
    tuning_class,
    use_tma,
)

# How the dK/dV kernel treats dQ: not at all (a dQ kernel recomputes the scores), float32 atomics
# per element, or bulk tile reductions by the tensor memory accelerator (Hopper's TMA reduce-add).
DQ_RECOMPUTE = tl.constexpr(0)
DQ_ATOMIC = tl.constexpr(1)
DQ_BULK = tl.constexpr(2)
DQ_ENV = "DILATED_ATTN_TRITON_DQ"


@triton.jit
def _delta_kernel(
    O,
    DO,
    DLSE,
    DELTA,
    total_rows,
    seq_len,
    num_heads,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # Rows in (b, n, h) order in; D out in the same order or with HEAD_MAJOR in (b, h, n) order.
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_r = offs_r < total_rows
    mask = mask_r[:, None] & (offs_d[None, :] < HEAD_DIM)
    offs = offs_r[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + offs_r, mask=mask_r, other=0.0)
    if HEAD_MAJOR:
        head = offs_r % num_heads
        rest = offs_r // num_heads
        pos = rest % seq_len
        batch = rest // seq_len
        tl.store(DELTA + (batch * num_heads + head) * seq_len + pos, delta, mask=mask_r)
    else:
        tl.store(DELTA + offs_r, delta, mask=mask_r)


@triton.jit
def _dkdv_block(
    dk,
    dv,
    k,
    v,
    q_src,
    do_src,
    dq_dst,
    lse_block,
    delta_block,
    tile_offs,
    lse_tile_offs,
    offs_k,
    offs_n,
    offs_d,
    start_n,
    rows,
    row_stride,
    lse_row_stride,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    DQ_MODE: tl.constexpr,
):
    q_rows = start_n + offs_n
    offs = start_n * row_stride + tile_offs
    lse_offs = start_n * lse_row_stride + lse_tile_offs
    q, do = load_row_tiles(
        q_src, do_src, start_n, offs, q_rows, rows, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASKED, USE_TMA
    )
    if MASKED:
        lse2 = tl.load(lse_block + lse_offs, mask=q_rows < rows, other=0.0) * LOG2E
        delta = tl.load(delta_block + lse_offs, mask=q_rows < rows, other=0.0)
    else:
        lse2 = tl.load(lse_block + lse_offs) * LOG2E
        delta = tl.load(delta_block + lse_offs)
    # Transposed scores (keys x queries), so that dV and dK come out of plain products.
    pT = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])
    if MASKED:
        valid = q_rows[None, :] < rows
        if CAUSAL:
            valid = valid & (q_rows[None, :] >= offs_k[:, None])
        pT = tl.where(valid, pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    if DQ_MODE != DQ_RECOMPUTE:
        # This key block's share of dQ, scaled, added into the float32 accumulator (rows past the
        # head's are dropped): one product here instead of a dQ kernel recomputing P and dP.
        dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=DOT_PRECISION) * scale
        if DQ_MODE == DQ_BULK:
            dq_dst.atomic_add([start_n, 0], dq)
        else:
            dq_mask = (q_rows[:, None] < rows) & (offs_d[None, :] < HEAD_DIM)
            tl.atomic_add(dq_dst + offs, dq, mask=dq_mask, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_blocks(
    dk,
    dv,
    k,
    v,
    q_src,
    do_src,
    dq_dst,
    lse_block,
    delta_block,
    tile_offs,
    lse_tile_offs,
    offs_k,
    offs_n,
    offs_d,
    lo,
    hi,
    rows,
    row_stride,
    lse_row_stride,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DQ_MODE: tl.constexpr,
):
    """The query blocks from ``lo`` up to ``hi`` of one head."""
    for start_n in range(lo, hi, BLOCK_N):
        dk, dv = _dkdv_block(
            dk,
            dv,
            k,
            v,
            q_src,
            do_src,
            dq_dst,
            lse_block,
            delta_block,
            tile_offs,
            lse_tile_offs,
            offs_k,
            offs_n,
            offs_d,
            start_n,
            rows,
            row_stride,
            lse_row_stride,
            qk_scale,
            scale,
            HEAD_DIM,
            HEAD_DIM_PAD,
            MASKED,
            CAUSAL,
            DOT_PRECISION,
            USE_TMA,
            DQ_MODE,
        )
    return dk, dv


@triton.jit
def _dkdv_heads_blocks(
    dk,
    dv,
    k,
    v,
    q_ptr,
    do_ptr,
    dq_ptr,
    lse_block,
    delta_block,
    tile_offs,
    lse_tile_offs,
    offs_k,
    offs_n,
    offs_d,
    lo,
    hi,
    count,
    head_step,
    lse_head_step,
    rows,
    row_stride,
    lse_row_stride,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DQ_MODE: tl.constexpr,
):
    """The query blocks from ``lo`` up to ``hi`` of ``count`` heads (``head_step`` elements apart in
    Q and dO, ``lse_head_step`` in the LSE and D), heads outer, as one flat loop: a loop over heads
    around the block loop spilled registers (sm_90, 255 registers at d = 64) where the flat one
    compiles like a single head's."""
    blocks = tl.cdiv(hi - lo, BLOCK_N)
    for t in range(0, count * blocks):
        i = t // blocks
        start_n = lo + (t - i * blocks) * BLOCK_N
        q_src = row_source(q_ptr + i * head_step, rows, row_stride, BLOCK_N, HEAD_DIM, USE_TMA)
        do_src = row_source(do_ptr + i * head_step, rows, row_stride, BLOCK_N, HEAD_DIM, USE_TMA)
        dq_dst = row_source(dq_ptr + i * head_step, rows, row_stride, BLOCK_N, HEAD_DIM, DQ_MODE == DQ_BULK)
        dk, dv = _dkdv_block(
            dk,
            dv,
            k,
            v,
            q_src,
            do_src,
            dq_dst,
            lse_block + i * lse_head_step,
            delta_block + i * lse_head_step,
            tile_offs,
            lse_tile_offs,
            offs_k,
            offs_n,
            offs_d,
            start_n,
            rows,
            row_stride,
            lse_row_stride,
            qk_scale,
            scale,
            HEAD_DIM,
            HEAD_DIM_PAD,
            MASKED,
            CAUSAL,
            DOT_PRECISION,
            USE_TMA,
            DQ_MODE,
        )
    return dk, dv


# Triton turns int arguments equal to 1 into constants; r = 1 must stay a tensor for .to().
@triton.jit(do_not_specialize=["dilation"])
def _dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    DQACC,
    acc_stride_b,
    stride_b,
    stride_n,
    stride_h,
    kv_stride_b,
    kv_stride_n,
    lse_stride_b,
    lse_stride_n,
    lse_stride_h,
    seq_len,
    segment,
    dilation,
    head0,
    num_heads,
    num_segments,
    max_rows,
    qk_scale,
    scale,
    tune_class,  # read by the autotuner's key only
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    DQ_MODE: tl.constexpr,
):
    # This program owns BLOCK_M key rows and walks the query rows that see them, BLOCK_N at a time.
    batch, head, seg, start_m = program_coords(max_rows, num_segments, num_heads, head0, BLOCK_M)
    first, rows = row_geometry(seg, head, seq_len, segment, dilation)
    if GROUP == 1:
        active = start_m < rows
    else:
        # The query heads of this launch that read this K/V head with this head's offset (head,
        # head + r, ...) select the same key rows: the first of them sums all their shares, so every
        # dK/dV row has one writer (no atomics, a fixed order); the others have nothing to do.
        group_lo = tl.maximum((head // GROUP) * GROUP, head0)
        group_hi = tl.minimum((head // GROUP + 1) * GROUP, head0 + num_heads)
        active = (start_m < rows) & (head - dilation < group_lo)
    if active:
        row_stride = dilation.to(tl.int64) * stride_n
        lse_row_stride = dilation.to(tl.int64) * lse_stride_n
        base = batch.to(tl.int64) * stride_b + first.to(tl.int64) * stride_n + head.to(tl.int64) * stride_h
        lse_base = (
            batch.to(tl.int64) * lse_stride_b
            + first.to(tl.int64) * lse_stride_n
            + head.to(tl.int64) * lse_stride_h
        )
        kv_base, kv_row_stride = kv_rows(
            base, row_stride, batch, head, first, dilation, stride_h, kv_stride_b, kv_stride_n, GROUP
        )
        # The dQ accumulator (DQ_MODE != DQ_RECOMPUTE) has Q's row and head strides, its own batch stride.
        acc_base = (
            batch.to(tl.int64) * acc_stride_b + first.to(tl.int64) * stride_n + head.to(tl.int64) * stride_h
        )
        offs_k = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        tile_offs = offs_n.to(tl.int64)[:, None] * row_stride + offs_d[None, :]
        lse_tile_offs = offs_n.to(tl.int64) * lse_row_stride
        key_offs = offs_k.to(tl.int64)[:, None] * kv_row_stride + offs_d[None, :]
        key_mask = (offs_k[:, None] < rows) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + kv_base + key_offs, mask=key_mask, other=0.0)
        v = tl.load(V + kv_base + key_offs, mask=key_mask, other=0.0)
        dk = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        dv = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        if CAUSAL:
            # Queries before start_m see none of these keys; those in the band up to the end of
            # the key block see some of them (masked); later ones see all of them.
            lo = (start_m // BLOCK_N) * BLOCK_N
            mid = tl.cdiv(start_m + BLOCK_M, BLOCK_N) * BLOCK_N
        else:
            lo = 0
            mid = 0
        full_end = (rows // BLOCK_N) * BLOCK_N
        # Three runs of query blocks: the causal band (masked), full blocks, the tail (masked).
        if GROUP == 1:
            q_src = row_source(Q + base, rows, row_stride, BLOCK_N, HEAD_DIM, USE_TMA)
            do_src = row_source(DO + base, rows, row_stride, BLOCK_N, HEAD_DIM, USE_TMA)
            dq_dst = row_source(DQACC + acc_base, rows, row_stride, BLOCK_N, HEAD_DIM, DQ_MODE == DQ_BULK)
            dk, dv = _dkdv_blocks(
                dk,
                dv,
                k,
                v,
                q_src,
                do_src,
                dq_dst,
                LSE + lse_base,
                DELTA + lse_base,
                tile_offs,
                lse_tile_offs,
                offs_k,
                offs_n,
                offs_d,
                lo,
                mid,
                rows,
                row_stride,
                lse_row_stride,
                qk_scale,
                scale,
                HEAD_DIM,
                HEAD_DIM_PAD,
                True,
                CAUSAL,
                DOT_PRECISION,
                BLOCK_N,
                USE_TMA,
                DQ_MODE,
            )
            dk, dv = _dkdv_blocks(
                dk,
                dv,
                k,
                v,
                q_src,
                do_src,
                dq_dst,
                LSE + lse_base,
                DELTA + lse_base,
                tile_offs,
                lse_tile_offs,
                offs_k,
                offs_n,
                offs_d,
                mid,
                full_end,
                rows,
                row_stride,
                lse_row_stride,
                qk_scale,
                scale,
                HEAD_DIM,
                HEAD_DIM_PAD,
                False,
                CAUSAL,
                DOT_PRECISION,
                BLOCK_N,
                USE_TMA,
                DQ_MODE,
            )
            dk, dv = _dkdv_blocks(
                dk,
                dv,
                k,
                v,
                q_src,
                do_src,
                dq_dst,
                LSE + lse_base,
                DELTA + lse_base,
                tile_offs,
                lse_tile_offs,
                offs_k,
                offs_n,
                offs_d,
                tl.maximum(mid, full_end),
                rows,
                rows,
                row_stride,
                lse_row_stride,
                qk_scale,
                scale,
                HEAD_DIM,
                HEAD_DIM_PAD,
                True,
                CAUSAL,
                DOT_PRECISION,
                BLOCK_N,
                USE_TMA,
                DQ_MODE,
            )
        else:
            # Heads r apart lie r * d elements apart in Q and dO and r head strides apart in the LSE and D.
            count = tl.cdiv(group_hi - head, dilation)
            head_step = dilation.to(tl.int64) * stride_h
            lse_head_step = dilation.to(tl.int64) * lse_stride_h
            dk, dv = _dkdv_heads_blocks(
                dk,
                dv,
                k,
                v,
                Q + base,
                DO + base,
                DQACC + acc_base,
                LSE + lse_base,
                DELTA + lse_base,
                tile_offs,
                lse_tile_offs,
                offs_k,
                offs_n,
                offs_d,
                lo,
                mid,
                count,
                head_step,
                lse_head_step,
                rows,
                row_stride,
                lse_row_stride,
                qk_scale,
                scale,
                HEAD_DIM,
                HEAD_DIM_PAD,
                True,
                CAUSAL,
                DOT_PRECISION,
                BLOCK_N,
                USE_TMA,
                DQ_MODE,
            )
            dk, dv = _dkdv_heads_blocks(
                dk,
                dv,
                k,
                v,
                Q + base,
                DO + base,
                DQACC + acc_base,
                LSE + lse_base,
                DELTA + lse_base,
                tile_offs,
                lse_tile_offs,
                offs_k,
                offs_n,
                offs_d,
                mid,
                full_end,
                count,
                head_step,
                lse_head_step,
                rows,
                row_stride,
                lse_row_stride,
                qk_scale,
                scale,
                HEAD_DIM,
                HEAD_DIM_PAD,
                False,
                CAUSAL,
                DOT_PRECISION,
                BLOCK_N,
                USE_TMA,
                DQ_MODE,
            )
            dk, dv = _dkdv_heads_blocks(
                dk,
                dv,
                k,
                v,
                Q + base,
                DO + base,
                DQACC + acc_base,
                LSE + lse_base,
                DELTA + lse_base,
                tile_offs,
                lse_tile_offs,
                offs_k,
                offs_n,
                offs_d,
                tl.maximum(mid, full_end),
                rows,
                count,
                head_step,
                lse_head_step,
                rows,
                row_stride,
                lse_row_stride,
                qk_scale,
                scale,
                HEAD_DIM,
                HEAD_DIM_PAD,
                True,
                CAUSAL,
                DOT_PRECISION,
                BLOCK_N,
                USE_TMA,
                DQ_MODE,
            )
        dk *= scale
        if ACCUMULATE:
            dk += tl.load(DK + kv_base + key_offs, mask=key_mask, other=0.0).to(tl.float32)
            dv += tl.load(DV + kv_base + key_offs, mask=key_mask, other=0.0).to(tl.float32)
        tl.store(DK + kv_base + key_offs, dk.to(DK.dtype.element_ty), mask=key_mask)
        tl.store(DV + kv_base + key_offs, dv.to(DV.dtype.element_ty), mask=key_mask)


@triton.jit
def _dq_block(
    dq,
    q,
    do,
    lse2,
    delta,
    k_src,
    v_src,
    tile_offs,
    offs_m,
    offs_n,
    offs_d,
    start_n,
    rows,
    kv_row_stride,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    key_rows = start_n + offs_n
    offs = start_n * kv_row_stride + tile_offs
    k, v = load_row_tiles(
        k_src, v_src, start_n, offs, key_rows, rows, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASKED, USE_TMA
    )
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
    if MASKED:
        valid = key_rows[None, :] < rows
        if CAUSAL:
            valid = valid & (key_rows[None, :] <= offs_m[:, None])
        p = tl.where(valid, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


# Triton turns int arguments equal to 1 into constants; r = 1 must stay a tensor for .to().
@triton.jit(do_not_specialize=["dilation"])
def _dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    stride_b,
    stride_n,
    stride_h,
    kv_stride_b,
    kv_stride_n,
    lse_stride_b,
    lse_stride_n,
    lse_stride_h,
    seq_len,
    segment,
    dilation,
    head0,
    num_heads,
    num_segments,
    max_rows,
    qk_scale,
    scale,
    tune_class,  # read by the autotuner's key only
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    batch, head, seg, start_m = program_coords(max_rows, num_segments, num_heads, head0, BLOCK_M)
    first, rows = row_geometry(seg, head, seq_len, segment, dilation)
    if start_m < rows:
        row_stride = dilation.to(tl.int64) * stride_n
        base = batch.to(tl.int64) * stride_b + first.to(tl.int64) * stride_n + head.to(tl.int64) * stride_h
        kv_base, kv_row_stride = kv_rows(
            base, row_stride, batch, head, first, dilation, stride_h, kv_stride_b, kv_stride_n, GROUP
        )
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        tile_offs = offs_n.to(tl.int64)[:, None] * kv_row_stride + offs_d[None, :]
        row_offs = offs_m.to(tl.int64)[:, None] * row_stride + offs_d[None, :]
        row_mask = (offs_m[:, None] < rows) & (offs_d[None, :] < HEAD_DIM)
        lse_offs = (
            batch.to(tl.int64) * lse_stride_b
            + (first + offs_m * dilation).to(tl.int64) * lse_stride_n
            + head.to(tl.int64) * lse_stride_h
        )
        row_valid = offs_m < rows
        q = tl.load(Q + base + row_offs, mask=row_mask, other=0.0)
        do = tl.load(DO + base + row_offs, mask=row_mask, other=0.0)
        lse2 = tl.load(LSE + lse_offs, mask=row_valid, other=0.0) * LOG2E
        delta = tl.load(DELTA + lse_offs, mask=row_valid, other=0.0)
        k_src = row_source(K + kv_base, rows, kv_row_stride, BLOCK_N, HEAD_DIM, USE_TMA)
        v_src = row_source(V + kv_base, rows, kv_row_stride, BLOCK_N, HEAD_DIM, USE_TMA)
        dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        if CAUSAL:
            hi = tl.minimum(rows, start_m + BLOCK_M)
            full_hi = (start_m // BLOCK_N) * BLOCK_N
        else:
            hi = rows
            full_hi = (rows // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_hi, BLOCK_N):
            dq = _dq_block(
                dq,
                q,
                do,
                lse2,
                delta,
                k_src,
                v_src,
                tile_offs,
                offs_m,
                offs_n,
                offs_d,
                start_n,
                rows,
                kv_row_stride,
                qk_scale,
                HEAD_DIM,
                HEAD_DIM_PAD,
                False,
                CAUSAL,
                DOT_PRECISION,
                USE_TMA,
            )
        for start_n in range(full_hi, hi, BLOCK_N):
            dq = _dq_block(
                dq,
                q,
                do,
                lse2,
                delta,
                k_src,
                v_src,
                tile_offs,
                offs_m,
                offs_n,
                offs_d,
                start_n,
                rows,
                kv_row_stride,
                qk_scale,
                HEAD_DIM,
                HEAD_DIM_PAD,
                True,
                CAUSAL,
                DOT_PRECISION,
                USE_TMA,
            )
        dq *= scale
        if ACCUMULATE:
            dq += tl.load(DQ + base + row_offs, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(DQ + base + row_offs, dq.to(DQ.dtype.element_ty), mask=row_mask)


# With dQ accumulated here the kernel adds into DQACC: the tuner zeroes it before timing each
# candidate, and the first launch it tunes is the first of its call, which finds DQACC all zeros.
_dkdv_tuned = triton.autotune(
    configs=configs_for("dkdv"),
    key=["HEAD_DIM_PAD", "GROUP", "CAUSAL", "tune_class", "USE_TMA", "DQ_MODE"],
    prune_configs_by={"early_config_prune": pruner("dkdv")},
    reset_to_zero=["DQACC"],
)(_dkdv_kernel)

_dq_tuned = triton.autotune(
    configs=configs_for("dq"),
    key=["HEAD_DIM_PAD", "GROUP", "CAUSAL", "tune_class", "USE_TMA"],
    prune_configs_by={"early_config_prune": pruner("dq")},
)(_dq_kernel)


def compute_delta(
    out: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None, *, head_major: bool = False
) -> torch.Tensor:
    """``rowsum(dout * out) - dlse``: ``(b, n, h)`` float32 from contiguous ``(b, n, h, d)`` tensors
    (and a contiguous ``dlse``); with ``head_major`` stored like ``stats_head_major``'s result."""
    b, n, h, d = out.shape
    if head_major:
        result = torch.empty((b, h, n), dtype=torch.float32, device=out.device).transpose(1, 2)
    else:
        result = torch.empty((b, n, h), dtype=torch.float32, device=out.device)
    total = b * n * h
    block = 16 if interpreting() else max(16, 8192 // head_dim_pad(d))
    _delta_kernel[(triton.cdiv(total, block),)](
        out,
        dout,
        dlse if dlse is not None else result,
        result,
        total,
        n,
        h,
        HEAD_DIM=d,
        HEAD_DIM_PAD=head_dim_pad(d),
        HAS_DLSE=dlse is not None,
        HEAD_MAJOR=head_major,
        BLOCK_R=block,
    )
    return result


def backward_launch(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    launch: Launch,
    *,
    causal: bool,
    scale: float,
    dq_mode: int = 0,
    tune_class: int | None = None,
) -> None:
    """Add one pattern's gradients into ``dq, dk, dv`` (or write them, for a head's first launch).

    ``q, dout`` contiguous ``(b, n, h, d)`` (or views of such along ``n``), ``k, v, dk, dv`` the same
    with ``h_kv`` heads dividing ``h``; ``lse`` (merged) and ``delta`` ``(b, n, h)`` float32 in any
    strides (the backward passes head-major ones). ``dq`` is like ``q`` (written or merged by a dQ kernel that recomputes
    the scores, ``dq_mode=0``), or with ``dq_mode`` 1 (element atomics) or 2 (bulk reductions) a
    float32 accumulator with ``q``'s row and head strides that the dK/dV kernel adds the scaled
    ``dS K`` into. ``tune_class``: the whole call's ``tuning_class`` when this launch covers a part
    of it (default: from these tensors' shape).
    """
    b, n, h, d = q.shape
    max_rows = launch.max_rows()
    segments = launch.num_segments(n)

    def grid(meta: dict) -> tuple[int]:
        return (b * launch.num_heads * segments * triton.cdiv(max_rows, meta["BLOCK_M"]),)

    # Descriptors measured no faster here (196 vs 198 ms fwd+bwd at longnet-1m on an H200): the
    # backward keeps pointer loads unless DILATED_ATTN_TRITON_TMA=1 asks for them.
    tma = use_tma(q, k, v, dout, explicit_only=True)
    if tma or dq_mode == 2:
        install_scratch_allocator(q.device)
    common = dict(
        USE_TMA=tma,
        HEAD_DIM=d,
        HEAD_DIM_PAD=head_dim_pad(d),
        GROUP=h // k.shape[2],
        CAUSAL=causal,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    geometry = (
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        lse.stride(0),
        lse.stride(1),
        lse.stride(2),
        n,
        launch.segment,
        launch.dilation,
        launch.head0,
        launch.num_heads,
        segments,
        max_rows,
        scale * math.log2(math.e),
        scale,
        tuning_class(b, n, h) if tune_class is None else tune_class,
    )
    # Without dQ reductions the dK/dV kernel never touches its accumulator argument; a fresh one-element
    # tensor stands in (the tuner zeroes it; allocated per call, so CUDA graph capture owns it too).
    acc = dq if dq_mode else torch.empty(1, dtype=torch.float32, device=q.device)
    _dkdv_tuned[grid](
        q, k, v, dout, lse, delta, dk, dv, acc, acc.stride(0), *geometry,
        ACCUMULATE=launch.kv_accumulate, DQ_MODE=dq_mode, **common,
    )  # fmt: skip
    if not dq_mode:
        _dq_tuned[grid](q, k, v, dout, lse, delta, dq, *geometry, ACCUMULATE=launch.accumulate, **common)


def dq_mode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor) -> int:
    """How dQ is computed: 0 (a dQ kernel per pattern recomputes the scores; bitwise reproducible),
    2 (float32 tile reductions by the tensor memory accelerator in the dK/dV kernel) or, on Triton's
    interpreter only (to test the accumulation), 1 (float32 element atomics in the dK/dV kernel);
    1 and 2 sum in a run-dependent order and hold a float32 accumulator (``dq_chunk``).

    ``DILATED_ATTN_TRITON_DQ``: ``auto``/``recompute`` (default: 0; on an H200 at longnet-1m the
    reductions measured within 2.5 % of it either way, so reproducibility decides), ``atomic`` (2 for
    16-bit inputs on sm_90+ with head sizes 16, 32, 64 or 128, unless ``DILATED_ATTN_TRITON_TMA=0``;
    elsewhere 0, since element atomics measured slower than recomputing on every row).
    ``torch.use_deterministic_algorithms(True)`` means 0 whatever the setting.
    """
    setting = os.environ.get(DQ_ENV, "auto").strip().lower()
    if setting not in ("auto", "atomic", "recompute"):
        raise ValueError(f"{DQ_ENV}={setting!r} must be one of 'auto', 'atomic', 'recompute'")
    if setting != "atomic" or torch.are_deterministic_algorithms_enabled():
        return 0
    if interpreting():
        return 1
    bulk = (
        q.is_cuda
        and os.environ.get(TMA_ENV, "auto").strip().lower() != "0"
        and tma_eligible(q, k, v, dout)
        and torch.cuda.get_device_capability(q.device) >= (9, 0)
    )
    return 2 if bulk else 0


# The dQ accumulator covers about this share of the sequence at a time (whole segments of every
# pattern): float32 over an eighth of the length is a quarter of a 16-bit output. Patterns whose
# segment lengths have a least common multiple above n / 8 need longer passes (up to all of n:
# twice a 16-bit output).
DQ_CHUNKS = 8


def dq_chunk(n: int, plan: LaunchPlan) -> int:
    """Tokens per pass of the dQ accumulator: a multiple of every launch's segment, about ``n / DQ_CHUNKS``."""
    step = 1
    for launch in plan.launches:
        step = math.lcm(step, launch.segment)
    return max(1, min(n, step * max(1, -(-n // (DQ_CHUNKS * step)))))


# The backward reads the LSE and D of each query row once per key block (a 4-byte load per row): in a
# (b, h, n) layout a head's rows are adjacent, so those loads coalesce where r is small, instead of
# one 32-byte sector per row in (b, n, h).
HEAD_MAJOR_STATS = True


def stats_head_major(stats: torch.Tensor) -> torch.Tensor:
    """A ``(b, n, h)`` tensor as a view of a contiguous ``(b, h, n)`` copy (no copy if it already is one)."""
    b, n, h = stats.shape
    if stats.stride() == (h * n, 1, n):
        return stats
    return stats.transpose(1, 2).contiguous().transpose(1, 2)


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    plan: LaunchPlan,
    *,
    causal: bool,
    scale: float,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every launch of ``plan`` backwards: ``(dq, dk, dv)`` in ``grad_dtype`` (default: ``q``'s).

    Shapes as ``backward_launch`` takes them (made contiguous here); ``dlse=None`` when no gradient
    reaches the LSE. dQ comes from a dQ kernel per pattern or from the dK/dV kernel (``dq_mode``). In
    the second case the sequence is taken in chunks of whole segments (``dq_chunk``), each with every
    pattern adding into one float32 accumulator that is then cast into ``dq``: the accumulator costs
    a quarter of a 16-bit output where the segment lengths allow (see ``DQ_CHUNKS``). With a dQ kernel each gradient row has one writer per launch and launches run
    in a fixed order, so the result is bitwise reproducible run to run. Where the segment engine takes
    the call (``kernels.segments.segment_engine``: no ``dlse``, not deterministic, gradients in the
    inputs' dtype) it runs every launch.
    """
    dout, q, k, v, out = (t.contiguous() for t in (dout, q, k, v, out))
    dtype = q.dtype if grad_dtype is None else grad_dtype
    engine = segment_engine(q, k, v, out, dout, result_dtype=dtype, backward=True, dlse=dlse is not None)
    mode = 0 if engine else dq_mode(q, k, v, dout)
    dq = torch.empty(q.shape, dtype=dtype, device=q.device)
    dk, dv = (torch.empty(t.shape, dtype=dtype, device=t.device) for t in (k, v))
    # Rows no launch writes start at zero; with dQ from the accumulator (mode != 0) dq is written whole.
    zeroed = [dq] if plan.needs_init and not mode else []
    if plan.kv_needs_init:
        if k.shape[2] == q.shape[2]:
            zeroed += [dk, dv]
        else:  # K/V heads shared by a group: a launch's rows of one query head are not a K/V head's
            dk.zero_()
            dv.zero_()
    if zeroed:
        with device_guard(q):
            start_zeroed(zeroed, plan.launches)
    if engine:
        lse = lse.contiguous()
        with device_guard(q):
            for launch in plan.launches:
                segment_backward_launch(
                    dout, q, k, v, out, lse, dq, dk, dv, launch, causal=causal, scale=scale
                )
        return dq, dk, dv
    dlse = None if dlse is None else dlse.contiguous()
    lse = stats_head_major(lse) if HEAD_MAJOR_STATS else lse.contiguous()
    with device_guard(q):
        delta = compute_delta(out, dout, dlse, head_major=HEAD_MAJOR_STATS)
        if not mode:
            for launch in plan.launches:
                backward_launch(dout, q, k, v, lse, delta, dq, dk, dv, launch, causal=causal, scale=scale)
            return dq, dk, dv
        b, n, h, _ = q.shape
        chunk = dq_chunk(n, plan)
        tune = tuning_class(b, n, h)
        acc = torch.empty((q.shape[0], chunk, *q.shape[2:]), dtype=torch.float32, device=q.device)
        for start in range(0, n, chunk):
            part = slice(start, min(n, start + chunk))
            rows = part.stop - part.start
            acc_part = acc[:, :rows]
            acc_part.zero_()
            for launch in plan.launches:
                backward_launch(
                    dout[:, part], q[:, part], k[:, part], v[:, part], lse[:, part], delta[:, part],
                    acc_part, dk[:, part], dv[:, part], launch, causal=causal, scale=scale, dq_mode=mode,
                    tune_class=tune,
                )  # fmt: skip
            dq[:, part].copy_(acc_part)
    return dq, dk, dv
