"""The segment engine: a pattern's attention by cuDNN's fused SDPA on strided views, merged in place.

For a pattern ``(W, r)`` the query heads with offset ``o`` (``j % r == o``) select rows ``o, o + r, ...``
of every segment. On a contiguous ``(b, n, h, d)`` tensor those rows and heads form a strided view
``(segments, rows, heads, d)`` (row stride ``r * h * d``, head stride ``r * d``, segment stride
``W * h * d``), and a segment engine runs dense attention on a batch of such views with no gather copy:
exactly the work of the segment ceiling (cuDNN SDPA on independent segments), at its speed. Each call
returns its rows' output and log-sum-exp, which a small Triton kernel merges into ``out``/``lse`` like
the fused kernel's own epilogue; the backward takes the merged ``out`` and ``lse`` (so ``P`` and
``D = rowsum(dO * O)`` are the merged ones, as in ``kernels.backward``) and adds each call's ``dQ, dK,
dV`` into the gradients at the same views. A segment shorter than ``W`` at the end of the sequence is
a call of its own; ``W`` need not be a multiple of ``r``. Offset classes one row and one head apart may
be the heads of a single call (``_Call``).

Where it runs (``segment_engine``, for every launch of a call or none): CUDA on sm_90+, 16-bit inputs
with 16-byte aligned data, results in the inputs' dtype, head size a multiple of 8 up to 128 (and
above 32 in the forward, above 16 in the backward: at or below, the Triton kernels are faster), K/V
heads equal to query heads, cuDNN enabled in torch (``torch.backends.cudnn.enabled``,
``torch.backends.cuda.enable_cudnn_sdp``); the backward also needs no LSE gradient and not
``torch.use_deterministic_algorithms(True)`` (cuDNN's backward sums dQ in a run-dependent order);
elsewhere the Triton kernels run. Calls' results reach their views by ``kernels.rows``'s copy or
addition; with it head_groups forwards, once left to the Triton kernel to avoid torch's slower copy,
run here too (on an H200 at ``longnet-1m`` 2.6 % faster, 4.7 % causal). ``DILATED_ATTN_ENGINE=triton``
turns the engine off. Tests give the CPU an engine of its own (torch's CPU flash attention) through
``ENGINES``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dilated_attn.kernels.launches import Launch
from dilated_attn.kernels.rows import row_tile, scatter_into
from dilated_attn.kernels.tuning import head_dim_pad

ENGINE_ENV = "DILATED_ATTN_ENGINE"

# Query rows times heads per library call in the backward: bounds its temporaries (three 16-bit
# gradients and cuDNN's float32 dQ accumulator, ~10 bytes per element) to 1/32 of a 1M-token,
# 16-head output at d = 64.
BACKWARD_ROWS_PER_CALL = 1 << 19

# (q, k, v, causal, scale) -> out (B, hc, S, d), lse (B, hc, S) float32
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]
# (dout, q, k, v, out, lse (B, hc, S) contiguous, causal, scale) -> dq, dk, dv
Backward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Engine:
    forward: Forward
    backward: Backward
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int
    min_capability: tuple[int, int] | None  # CUDA only
    # Padded head sizes (``tuning.head_dim_pad``) from which the engine is faster than the Triton
    # kernels, (forward, backward): below them the Triton kernels take the call (0: at every size).
    faster_from: tuple[int, int] = (0, 0)


def _one_row_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query row on one key row (cuDNN refuses ``s_q = s_kv = 1``): ``v`` itself."""
    return v.clone(), (q.float() * k.float()).sum(-1) * scale


def _one_row_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one row on one key under the merged ``out`` and ``lse`` (as a fused backward forms them)."""
    qf, kf, vf, of, df = (t.float() for t in (q, k, v, out, dout))
    p = torch.exp((qf * kf).sum(-1) * scale - lse).unsqueeze(-1)
    ds = p * ((df * vf).sum(-1, keepdim=True) - (df * of).sum(-1, keepdim=True))
    return (ds * kf * scale).to(q.dtype), (ds * qf * scale).to(k.dtype), (p * df).to(v.dtype)


def _cudnn_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if q.shape[2] == 1 and k.shape[2] == 1:
        return _one_row_forward(q, k, v, scale)
    result = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale
    )
    out, lse = result[0], result[1]
    return out, lse.reshape(lse.shape[:3])


def _cudnn_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s_q, s_k = q.shape[2], k.shape[2]
    if s_q == 1 and s_k == 1:
        return _one_row_backward(dout, q, k, v, out, lse, scale)
    grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout,
        q,
        k,
        v,
        out,
        lse.unsqueeze(-1),
        None,
        None,
        None,
        None,
        None,
        s_q,
        s_k,
        0.0,
        causal,
        scale=scale,
    )
    return grads[0], grads[1], grads[2]


def cpu_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's CPU flash attention with its log-sum-exp (the engine tests give the CPU)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def cpu_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, scale=scale
    )
    return grads[0], grads[1], grads[2]


# Engines by device type. cuDNN's SDPA measured at the segment ceiling on strided views on an H200;
# sm_80 is left to the Triton kernels until measured there. cuDNN's time hardly changes with the head
# size below 64, while the Triton kernels' falls with their padded tile: on an H200 (longnet pattern,
# 512K tokens, 16 heads, bf16) the forward took 19.1 / 19.2 / 20.1 / 20.5 ms on cuDNN at d = 16 / 32 /
# 48 / 64 against 13.8 / 15.2 / 23.5 / 21.8 ms on Triton, and forward+backward 68.4 / 70.1 / 75.3 /
# 78.1 against 55.1 / 68.1 / 99.7 / 95.3 ms (the backward alone 49 / 51 against 41 / 53 ms at 16 / 32).
# So forwards with tiles below 64 and backwards with tiles below 32 run on the Triton kernels.
ENGINES: dict[str, Engine] = {
    "cuda": Engine(
        _cudnn_forward, _cudnn_backward, (torch.float16, torch.bfloat16), 128, (9, 0), faster_from=(64, 32)
    ),
}


def engine_setting() -> str:
    """``DILATED_ATTN_ENGINE``: ``auto`` (default: the segment engine where it runs) or ``triton``."""
    setting = os.environ.get(ENGINE_ENV, "auto").strip().lower()
    if setting not in ("auto", "triton"):
        raise ValueError(f"{ENGINE_ENV}={setting!r} must be one of 'auto', 'triton'")
    return setting


def unsupported(q: torch.Tensor, k: torch.Tensor, *tensors: torch.Tensor) -> str | None:
    """Why the segment engine cannot run ``q`` ``(b, n, h, d)`` with ``k`` ``(b, n, h_kv, d)`` (and
    ``tensors``, whose data must be aligned like theirs), or None."""
    tensors = (q, k, *tensors)
    engine = ENGINES.get(q.device.type)
    if engine is None:
        return f"no segment engine on device type {q.device.type!r}"
    if q.dtype not in engine.dtypes:
        return f"dtype {q.dtype} not in {engine.dtypes}"
    d = q.shape[-1]
    if d % 8 or d > engine.max_head_dim:
        return f"head_dim {d} is not a multiple of 8 up to {engine.max_head_dim}"
    if k.shape[2] != q.shape[2]:
        return f"grouped K/V heads ({k.shape[2]} for {q.shape[2]} query heads)"
    if any(t.data_ptr() % 16 for t in tensors):
        return "a tensor's data is not 16-byte aligned"
    if q.is_cuda:
        if not (
            torch.backends.cuda.cudnn_sdp_enabled()
            and torch.backends.cudnn.is_available()
            and torch.backends.cudnn.enabled
        ):
            return (
                "cuDNN attention is not available or disabled (torch.backends.cudnn.enabled, "
                "torch.backends.cuda.enable_cudnn_sdp)"
            )
        if (
            engine.min_capability is not None
            and torch.cuda.get_device_capability(q.device) < engine.min_capability
        ):
            return f"compute capability below sm_{engine.min_capability[0]}{engine.min_capability[1]}"
    return None


def segment_engine(
    q: torch.Tensor,
    k: torch.Tensor,
    *tensors: torch.Tensor,
    result_dtype: torch.dtype | None = None,
    backward: bool = False,
    dlse: bool = False,
) -> bool:
    """Whether the segment engine runs every launch of this call (see the module docstring).

    ``tensors``: the call's other inputs (V; in the backward also ``out`` and ``dout``, which must
    have the queries' dtype); ``result_dtype``: the output's or gradients' dtype, which must be the
    queries' (a composer's float32 result keeps the Triton kernels' float32 rows instead of rounded
    16-bit ones). A call is never split between engines: the Triton autotuner re-runs the first launch
    of a tuning key, which must be one that writes rather than merges.
    """
    if engine_setting() == "triton" or unsupported(q, k, *tensors) is not None:
        return False
    if head_dim_pad(q.shape[-1]) < ENGINES[q.device.type].faster_from[int(backward)]:
        return False
    if any(t.dtype != q.dtype for t in tensors) or result_dtype not in (None, q.dtype):
        return False
    return not (backward and (dlse or torch.are_deterministic_algorithms_enabled()))


def _writes_whole(launch: Launch, b: int, n: int, h: int) -> bool:
    """Whether ``launch`` is one call over every row of every head, whose output is used in place."""
    return (
        launch.dilation == 1
        and launch.head0 == 0
        and launch.num_heads == h
        and n % launch.segment == 0
        and b * (n // launch.segment) <= MAX_CALL_BATCH
    )


# cuDNN fails on a batch of 65,536 or more (segments x batch elements per call): calls split below it.
MAX_CALL_BATCH = 65535


@dataclass(frozen=True)
class _Block:
    """Whole segments of ``seglen`` tokens in ``[start, stop)``, of batch element ``batch`` (None: all)."""

    batch: int | None
    start: int
    stop: int
    seglen: int


def _blocks(b: int, n: int, segment: int) -> list[_Block]:
    full = n // segment * segment
    blocks = []
    if full:
        if b == 1 or full == n:
            blocks.append(_Block(None, 0, full, segment))
        else:  # batch and segment strides do not merge into one: a call per batch element
            blocks.extend(_Block(i, 0, full, segment) for i in range(b))
    if full < n:
        blocks.append(_Block(None, full, n, n - full))
    return blocks


def _offsets(launch: Launch) -> Iterator[tuple[int, int, int]]:
    """``(o, first head, heads)`` for each offset class of the launch's heads that has any."""
    r, lo, hi = launch.dilation, launch.head0, launch.head0 + launch.num_heads
    for o in range(r):
        first = lo + (o - lo) % r
        if first < hi:
            yield o, first, len(range(first, hi, r))


@dataclass(frozen=True)
class _Call:
    """One library call: rows ``o + r i`` of segments ``segs`` of ``block``, on ``size`` heads of a
    ``(segments, rows, size, ...)`` view whose head index ``c`` is row offset ``o + row_step c`` at
    head ``head + head_step c``.

    Consecutive offset classes ``o, o + 1, ...`` of a launch start at heads ``first, first + 1, ...``
    (``first`` the launch's first head of offset ``o``): one row and one head apart, a single stride. A
    run of such classes with the same number of heads and rows is taken either a call per class, over
    its heads (``row_step = 0``, ``head_step = r``), or a call per head position, over the classes
    (``row_step = head_step = 1``), whichever makes fewer calls: at ``r >= h`` every class has one head
    and one call takes them all (``longnet-1m``, 16 heads: 1, 2, 4, 2, 1 calls for r = 1 .. 16).
    """

    block: _Block
    o: int
    head: int
    size: int
    row_step: int
    head_step: int
    rows: int
    r: int
    segs: slice

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """The call's ``(segments, rows, size, ...)`` view of ``t`` ``(b, n, h, ...)``."""
        block = self.block
        part = (
            t[:, block.start : block.stop]
            if block.batch is None
            else t[block.batch, None, block.start : block.stop]
        )
        segments = part.shape[0] * ((block.stop - block.start) // block.seglen)
        part = part.view(segments, block.seglen, *part.shape[2:])
        s_seg, s_row, s_head, *rest = part.stride()
        view = part.as_strided(
            (segments, self.rows, self.size, *part.shape[3:]),
            (s_seg, self.r * s_row, self.row_step * s_row + self.head_step * s_head, *rest),
            part.storage_offset() + self.o * s_row + self.head * s_head,
        )
        return view[self.segs]


def _calls(b: int, n: int, launch: Launch, *, rows_per_call: int | None = None) -> Iterator[_Call]:
    """The library calls of one launch: each selected (batch, row, head) in exactly one."""
    r = launch.dilation
    classes = list(_offsets(launch))
    for block in _blocks(b, n, launch.segment):
        all_segments = (1 if block.batch is not None else b) * ((block.stop - block.start) // block.seglen)
        # Runs of classes stepping one row and one head, with the same heads and rows.
        runs: list[list[tuple[int, int, int, int]]] = []
        for o, first, count in classes:
            rows = len(range(o, block.seglen, r))
            if not rows:
                continue
            last = runs[-1][-1] if runs else None
            if last is not None and (o, first, count, rows) == (last[0] + 1, last[1] + 1, last[2], last[3]):
                runs[-1].append((o, first, count, rows))
            else:
                runs.append([(o, first, count, rows)])
        for run in runs:
            o0, first0, count, rows = run[0]
            if len(run) > count:  # a call per head of the classes, over all classes
                shapes = [(o0, first0 + r * j, len(run), 1, 1) for j in range(count)]
            else:  # a call per class, over its heads
                shapes = [(o, first, count, 0, r) for o, first, count, _ in run]
            for o, head, size, row_step, head_step in shapes:
                step = all_segments if rows_per_call is None else max(1, rows_per_call // (rows * size))
                step = min(step, MAX_CALL_BATCH)
                for start in range(0, all_segments, step):
                    segs = slice(start, min(all_segments, start + step))
                    yield _Call(block, o, head, size, row_step, head_step, rows, r, segs)


# Rows per program at head sizes up to 64 (half above), and warps, of the merge.
MERGE_TILE = (64, 4)


@triton.jit
def _merge_kernel(
    O,
    L,
    A,
    M,
    rows,
    heads,
    row_blocks,
    o_b,
    o_s,
    o_h,
    l_b,
    l_s,
    l_h,
    a_b,
    a_s,
    a_h,
    m_b,
    m_s,
    m_h,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    bb, hh, r, c = row_tile(row_blocks, heads, 0, BLOCK, HEAD_DIM_PAD)
    rmask = r < rows
    mask = rmask[:, None] & (c < HEAD_DIM)[None, :]
    li = tl.load(L + bb * l_b + hh * l_h + r * l_s, mask=rmask, other=float("-inf"))
    m_ptrs = M + bb * m_b + hh * m_h + r * m_s
    la = tl.load(m_ptrs, mask=rmask, other=float("-inf"))
    top = tl.maximum(li, la)
    top = tl.where(top == float("-inf"), 0.0, top)
    ei = tl.exp(li - top)
    ea = tl.exp(la - top)
    total = ei + ea
    some = total > 0.0  # both -inf (a row no call has reached yet): output 0, lse -inf
    safe_total = tl.where(some, total, 1.0)
    inv = tl.where(some, 1.0 / safe_total, 0.0)
    oi = tl.load(O + bb * o_b + hh * o_h + r[:, None] * o_s + c[None, :], mask=mask, other=0.0)
    a_ptrs = A + bb * a_b + hh * a_h + r[:, None] * a_s + c[None, :]
    oa = tl.load(a_ptrs, mask=mask, other=0.0)
    merged = oa.to(tl.float32) * (ea * inv)[:, None] + oi.to(tl.float32) * (ei * inv)[:, None]
    tl.store(a_ptrs, merged.to(A.dtype.element_ty), mask=mask)
    # A row's LSE is held by threads of several warps: none may store the merged value before all
    # have loaded the old one (without this barrier rows came out wrong, four at a time, in about a
    # third of the runs on an H200).
    tl.debug_barrier()
    tl.store(m_ptrs, tl.where(some, top + tl.log(safe_total), float("-inf")), mask=rmask)


def merge_into(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Merge ``part`` ``(B, S, hc, d)`` with log-sum-exps ``part_lse`` ``(B, S, hc)`` into the views
    ``out`` (same shape, last stride 1) and ``lse``: ``out = (e^lse out + e^part_lse part) / e^new``."""
    batch, rows, heads, d = out.shape
    if not batch * rows * heads:
        return
    if part.stride(-1) != 1:
        part = part.contiguous()
    block, warps = MERGE_TILE
    block = block // 2 if d > 64 else block
    row_blocks = triton.cdiv(rows, block)
    _merge_kernel[(batch * heads * row_blocks,)](
        part, part_lse, out, lse, rows, heads, row_blocks,
        part.stride(0), part.stride(1), part.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        HEAD_DIM=d, HEAD_DIM_PAD=head_dim_pad(d), BLOCK=block, num_warps=warps,
    )  # fmt: skip


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
) -> None:
    """Run one pattern by the segment engine and merge it into ``out`` and ``lse`` ``(b, n, h)`` (or
    write them, for the heads' first launch); tensors as ``kernels.forward.forward_launch`` takes them."""
    engine = ENGINES[q.device.type]
    b, n = q.shape[:2]
    for call in _calls(b, n, launch):
        qv, kv, vv, ov, lv = (call.view(t) for t in (q, k, v, out, lse))
        part, part_lse = engine.forward(
            qv.transpose(1, 2), kv.transpose(1, 2), vv.transpose(1, 2), causal, scale
        )
        if launch.accumulate:
            merge_into(ov, lv, part.transpose(1, 2), part_lse.transpose(1, 2))
        else:
            scatter_into([ov], [part.transpose(1, 2)], [False])
            lv.copy_(part_lse.transpose(1, 2))
        del part, part_lse  # freed before the next call allocates its own


def first_launch_whole(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, launch: Launch, *, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(out, lse)`` of a first launch that writes every row of every head (``r == 1`` on all heads,
    whole segments) as one call whose output is ``out`` itself (no copy where the engine's output has
    the queries' layout, as cuDNN's has); None for any other launch."""
    b, n, h, d = q.shape
    if not _writes_whole(launch, b, n, h):
        return None
    whole = _Call(_Block(None, 0, n, launch.segment), 0, 0, h, 0, 1, launch.segment, 1, slice(None))
    qv, kv, vv = (whole.view(t).transpose(1, 2) for t in (q, k, v))
    part, part_lse = ENGINES[q.device.type].forward(qv, kv, vv, causal, scale)
    lse = torch.empty((b, n, h), dtype=torch.float32, device=q.device)
    whole.view(lse).copy_(part_lse.transpose(1, 2))
    return part.transpose(1, 2).contiguous().view(b, n, h, d), lse


def backward_launch(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    launch: Launch,
    *,
    causal: bool,
    scale: float,
) -> None:
    """Add one pattern's gradients into ``dq, dk, dv`` (or write them, for the heads' first launch).

    All tensors contiguous ``(b, n, h, d)`` but ``lse`` ``(b, n, h)`` (merged, contiguous); no LSE
    gradient (``segment_engine``)."""
    engine = ENGINES[q.device.type]
    b, n = q.shape[:2]
    for call in _calls(b, n, launch, rows_per_call=BACKWARD_ROWS_PER_CALL):
        views = [call.view(t) for t in (dout, q, k, v, out, dq, dk, dv)]
        lv = call.view(lse)
        grads = engine.backward(
            *(t.transpose(1, 2) for t in views[:5]), lv.transpose(1, 2).contiguous(), causal, scale
        )
        scatter_into(
            views[5:],
            [grad.transpose(1, 2) for grad in grads],
            (launch.accumulate, launch.kv_accumulate, launch.kv_accumulate),
        )
        del grads  # freed before the next call allocates its own
