"""Where a program's rows lie: Triton helpers shared by the forward and backward kernels.

Every kernel runs on a 1-D grid of ``batch * heads * segments * blocks`` programs, one per tile of
``BLOCK_M`` dilated rows of one (batch, head, segment). Dilated row ``m`` of head ``j`` in segment
``s`` is position ``s*W + j % r + m*r``. With grouped-query attention (``GROUP = h / h_kv > 1``) query
head ``j`` reads those positions of K/V head ``j // GROUP``.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def program_coords(max_rows, num_segments, num_heads, head0, BLOCK_M: tl.constexpr):
    """(batch, head, segment, first dilated row) of this program on a 1-D grid.

    Programs of one (head, segment) are adjacent, so the key and value rows they share stay in L2.
    """
    pid = tl.program_id(0)
    blocks_per_segment = tl.cdiv(max_rows, BLOCK_M)
    start_m = (pid % blocks_per_segment) * BLOCK_M
    rest = pid // blocks_per_segment
    seg = rest % num_segments
    pid_bh = rest // num_segments
    return pid_bh // num_heads, head0 + pid_bh % num_heads, seg, start_m


@triton.jit
def row_geometry(seg, head, seq_len, segment, dilation):
    """First position of the head's rows in segment ``seg`` and how many rows it reads there."""
    offset = head % dilation
    seg_start = seg * segment
    seg_len = tl.minimum(segment, seq_len - seg_start)
    # seg_len - offset > -dilation, so the ceiling division never goes negative.
    rows = (seg_len - offset + dilation - 1) // dilation
    return seg_start + offset, rows


@triton.jit
def kv_rows(
    base, row_stride, batch, head, first, dilation, stride_h, kv_stride_b, kv_stride_n, GROUP: tl.constexpr
):
    """Base offset and row stride of the K/V rows that query head ``head`` reads from ``first`` on.

    ``base``/``row_stride`` are the query's; with ``GROUP == 1`` K/V share Q's layout and they are
    returned as they are, so kernels without grouped heads compute nothing more.
    """
    if GROUP == 1:
        return base, row_stride
    else:
        kv_base = (
            batch.to(tl.int64) * kv_stride_b
            + first.to(tl.int64) * kv_stride_n
            + (head // GROUP).to(tl.int64) * stride_h
        )
        return kv_base, dilation.to(tl.int64) * kv_stride_n


@triton.jit
def row_source(ptr, rows, row_stride, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """Where a loop reads a head's dilated rows from: ``ptr`` itself, or with ``USE_TMA`` a tensor
    descriptor over them (shape ``(rows, HEAD_DIM)``, row stride ``r*h*d``; bulk copies by the tensor
    memory accelerator on Hopper, rows past ``rows`` read as zeros)."""
    if USE_TMA:
        return tl.make_tensor_descriptor(
            ptr, shape=[rows, HEAD_DIM], strides=[row_stride, 1], block_shape=[BLOCK, HEAD_DIM]
        )
    else:
        return ptr


@triton.jit
def load_row_tiles(
    a_src,
    b_src,
    start,
    offs,
    tile_rows,
    rows,
    offs_d,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    MASKED: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Two ``(BLOCK, HEAD_DIM_PAD)`` tiles of the same rows (K and V, or Q and dO), from row ``start``.

    ``a_src``/``b_src`` come from ``row_source``. Pointer loads use ``offs`` (the tile's element
    offsets) and mask only where needed: rows past ``rows`` when ``MASKED``, padded columns when the
    head size is not a power of two; the unmasked path keeps the loads vectorised.
    """
    if USE_TMA:
        a = a_src.load([start, 0])
        b = b_src.load([start, 0])
    elif MASKED or HEAD_DIM != HEAD_DIM_PAD:
        mask = offs_d[None, :] < HEAD_DIM
        if MASKED:
            mask = mask & (tile_rows[:, None] < rows)
        a = tl.load(a_src + offs, mask=mask, other=0.0)
        b = tl.load(b_src + offs, mask=mask, other=0.0)
    else:
        a = tl.load(a_src + offs)
        b = tl.load(b_src + offs)
    return a, b
