"""Forward kernel: one pattern's attention on strided rows, merged into the running output.

A program owns ``BLOCK_M`` dilated query rows of one (batch, head, segment). Dilated row ``m`` of head
``j`` in segment ``s`` is position ``s*W + j % r + m*r``; on a contiguous ``(b, n, h, d)`` tensor the
rows of one head are ``r * h * d`` elements apart (``r * h_kv * d`` in keys and values with grouped
heads, read at K/V head ``j // (h / h_kv)``), so queries, keys and values are read with strided
loads and never gathered. The program runs an online softmax over the segment's key blocks, then
merges its rows into ``out``/``lse`` by their log-sum-exps (or writes them, for a head's first launch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from dilated_attn.kernels.geometry import (
    LN2,
    LOG2E,
    kv_rows,
    load_row_tiles,
    program_coords,
    row_geometry,
    row_source,
)
from dilated_attn.kernels.launches import Launch, LaunchPlan
from dilated_attn.kernels.rows import start_zeroed
from dilated_attn.kernels.segments import first_launch_whole, segment_engine
from dilated_attn.kernels.segments import forward_launch as segment_forward_launch
from dilated_attn.kernels.tuning import (
    configs_for,
    device_guard,
    dot_precision,
    head_dim_pad,
    install_scratch_allocator,
    pruner,
    tuning_class,
    use_tma,
)


@triton.jit
def _fwd_block(
    acc,
    l_i,
    m_i,
    q,
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
    # The tile offsets are fixed; only the (int64) start of the block moves.
    kv_offs = start_n * kv_row_stride + tile_offs
    k, v = load_row_tiles(
        k_src, v_src, start_n, kv_offs, key_rows, rows, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASKED, USE_TMA
    )
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        valid = key_rows[None, :] < rows
        if CAUSAL:
            valid = valid & (key_rows[None, :] <= offs_m[:, None])
        qk = tl.where(valid, qk, float("-inf"))
    # Scale the row maxima rather than the tile, so that the tile's scale and shift fuse into one FMA.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if MASKED:
        # A row whose keys are all masked so far keeps m = -inf; subtract 0 instead of -inf.
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.math.exp2(qk * qk_scale - m_new_safe[:, None])
    alpha = tl.math.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


# Triton turns int arguments equal to 1 into constants; r = 1 must stay a tensor for .to().
@triton.jit(do_not_specialize=["dilation"])
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    stride_b,
    stride_n,
    stride_h,
    kv_stride_b,
    kv_stride_n,
    lse_stride_b,
    lse_stride_n,
    seq_len,
    segment,
    dilation,
    head0,
    num_heads,
    num_segments,
    max_rows,
    qk_scale,
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
        k_src = row_source(K + kv_base, rows, kv_row_stride, BLOCK_N, HEAD_DIM, USE_TMA)
        v_src = row_source(V + kv_base, rows, kv_row_stride, BLOCK_N, HEAD_DIM, USE_TMA)
        q = tl.load(Q + base + row_offs, mask=row_mask, other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        if CAUSAL:
            hi = tl.minimum(rows, start_m + BLOCK_M)
            # Keys before start_m precede every query row of the block: no mask needed.
            full_hi = (start_m // BLOCK_N) * BLOCK_N
        else:
            hi = rows
            full_hi = (rows // BLOCK_N) * BLOCK_N
        for start_n in range(0, full_hi, BLOCK_N):
            acc, l_i, m_i = _fwd_block(
                acc,
                l_i,
                m_i,
                q,
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
            acc, l_i, m_i = _fwd_block(
                acc,
                l_i,
                m_i,
                q,
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

        # Rows past `rows` are never stored; give them a harmless denominator.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse2 = m_i + tl.math.log2(l_safe)  # log2 units
        lse_offs = (
            batch.to(tl.int64) * lse_stride_b + (first + offs_m * dilation).to(tl.int64) * lse_stride_n + head
        )
        row_valid = offs_m < rows
        if ACCUMULATE:
            prev2 = tl.load(LSE + lse_offs, mask=row_valid, other=float("-inf")) * LOG2E
            prev = tl.load(O + base + row_offs, mask=row_mask, other=0.0).to(tl.float32)
            # lse2 is finite on every stored row, so the merged value is finite too.
            top = tl.maximum(prev2, lse2)
            merged2 = top + tl.math.log2(tl.math.exp2(prev2 - top) + tl.math.exp2(lse2 - top))
            out = prev * tl.math.exp2(prev2 - merged2)[:, None] + out * tl.math.exp2(lse2 - merged2)[:, None]
            lse2 = merged2
            # Every thread holding a row's LSE loads it before any stores the merged one (the row
            # vectors may be spread over warps; see segments._merge_kernel).
            tl.debug_barrier()
        tl.store(O + base + row_offs, out.to(O.dtype.element_ty), mask=row_mask)
        tl.store(LSE + lse_offs, lse2 * LN2, mask=row_valid)


_fwd_tuned = triton.autotune(
    configs=configs_for("forward"),
    key=["HEAD_DIM_PAD", "GROUP", "CAUSAL", "tune_class", "USE_TMA"],
    prune_configs_by={"early_config_prune": pruner("forward")},
)(_fwd_kernel)


def forward_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    launch: Launch,
    *,
    causal: bool,
    scale: float,
    variant: Mapping[str, Any] | None = None,
) -> None:
    """Run one pattern and merge it into ``out`` ``(b, n, h, d)`` and ``lse`` ``(b, n, h)`` float32.

    ``q`` ``(b, n, h, d)``, ``k``/``v`` ``(b, n, h_kv, d)`` with ``h_kv`` dividing ``h``; all tensors
    contiguous; ``out`` has the inputs' dtype. ``variant`` (for measurements) overrides ``USE_TMA``
    and, with ``config=(BLOCK_M, BLOCK_N, warps, stages)``, launches that tile untuned.
    """
    variant = dict(variant or {})
    tma = variant.pop("USE_TMA", None)
    tma = use_tma(q, k, v) if tma is None else bool(tma)
    if tma:
        install_scratch_allocator(q.device)
    config = variant.pop("config", None)
    if variant:
        raise TypeError(f"variant keys {sorted(variant)} are not known; use USE_TMA, config")
    b, n, h, d = q.shape
    max_rows = launch.max_rows()
    segments = launch.num_segments(n)

    def grid(meta: dict) -> tuple[int]:
        return (b * launch.num_heads * segments * triton.cdiv(max_rows, meta["BLOCK_M"]),)

    if config is None:
        kernel, launch_options = _fwd_tuned, {}
    else:
        block_m, block_n, warps, stages = config
        kernel = _fwd_kernel
        launch_options = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
    kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        lse.stride(0),
        lse.stride(1),
        n,
        launch.segment,
        launch.dilation,
        launch.head0,
        launch.num_heads,
        segments,
        max_rows,
        scale * math.log2(math.e),
        tuning_class(b, n, h),
        HEAD_DIM=d,
        HEAD_DIM_PAD=head_dim_pad(d),
        GROUP=h // k.shape[2],
        CAUSAL=causal,
        ACCUMULATE=launch.accumulate,
        DOT_PRECISION=dot_precision(q.dtype),
        USE_TMA=tma,
        **launch_options,
    )


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: LaunchPlan,
    *,
    causal: bool,
    scale: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every launch of ``plan``: ``out`` ``(b, n, h, d)`` in ``out_dtype`` (default: ``q``'s) and
    ``lse`` ``(b, n, h)`` float32. Where the plan leaves rows unwritten, rows no launch reaches give 0
    and ``-inf`` (``kernels.rows.start_zeroed``). Every launch runs on the segment engine
    (``kernels.segments``) where it takes these inputs, else on the Triton kernel."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, n, h, _ = q.shape
    dtype = q.dtype if out_dtype is None else out_dtype
    launches = plan.launches
    engine = segment_engine(q, k, v, result_dtype=dtype)
    with device_guard(q):
        whole = None
        if engine and launches and not plan.needs_init:
            whole = first_launch_whole(q, k, v, launches[0], causal=causal, scale=scale)
        if whole is not None:
            out, lse = whole
            launches = launches[1:]
        else:
            out = torch.empty(q.shape, dtype=dtype, device=q.device)
            lse = torch.empty((b, n, h), dtype=torch.float32, device=q.device)
            if plan.needs_init:
                start_zeroed([out], launches, stats=lse)
        run = segment_forward_launch if engine else forward_launch
        for launch in launches:
            run(q, k, v, out, lse, launch, causal=causal, scale=scale)
    return out, lse
