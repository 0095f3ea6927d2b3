"""The one-token decode step over a ``DilatedKVCache``: split-K with one LSE reduction.

Two launches, no host synchronisation and shapes fixed by the cache, so a step can be captured in a
CUDA graph:

``_decode_partial``, grid ``(batch * heads, items)``. An item is one (pattern, split) pair: split ``s``
of pattern ``i`` covers keys ``[s * SPLIT, (s + 1) * SPLIT)`` of the query's dilated row in its current
segment (at most ``ceil(min(w_i, table) / r_i)`` keys, so the item count is static). The query at
position ``p = lengths[b]`` is in pattern ``i`` for head ``j`` only when ``(p - s0) % r_i == j % r_i``
and ``j`` is in the pattern's head set; other programs write an empty partial and stop. Active ones
walk their keys ``s0 + j % r_i + m * r_i``, find each key's row through the slot table, and write
their online-softmax state ``(m, l, acc)``. The key at ``p`` itself is read from the new ``k, v`` (its
row is written by this launch), and one program per (sequence, K/V head) stores it.

``_decode_reduce``, grid ``(batch * heads,)``: merges every item's state by log-sum-exp (patterns and
splits alike: SPEC 1a's one softmax over the multiset union), writes ``out`` and ``lse``, and advances
``lengths``.

Each sequence's rows live in their own pool lease; kernels reach them as ``anchor + offsets[b]``.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from dilated_attn.kernels.geometry import LN2, LOG2E
from dilated_attn.kernels.tuning import interpreting
from dilated_attn.kvcache import DilatedKVCache

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Keys per (pattern, split) item and per loop step. Under the interpreter they are small so that
# short tests cross split and block edges.
_SPLIT, _BLOCK_N, _WARPS = (8, 4, 1) if interpreting() else (256, 64, 4)


@triton.jit
def _decode_partial(
    Q,
    K_NEW,
    V_NEW,
    ANCHOR,
    OFFSETS,
    SLOTS,
    LENGTHS,
    SEGMENT,
    RATE,
    HEAD_LO,
    HEAD_HI,
    ITEM_PATTERN,
    ITEM_SPLIT,
    M_OUT,
    L_OUT,
    ACC_OUT,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    num_heads,
    group,
    table_length,
    num_slots,
    num_items,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    item = tl.program_id(1)
    b = pid // num_heads
    j = pid % num_heads
    c = j // group
    pattern = tl.load(ITEM_PATTERN + item)
    split = tl.load(ITEM_SPLIT + item)
    w = tl.load(SEGMENT + pattern)
    r = tl.load(RATE + pattern)
    member = (j >= tl.load(HEAD_LO + pattern)) & (j < tl.load(HEAD_HI + pattern))
    p = tl.load(LENGTHS + b)
    s0 = p // w * w
    offset = j % r
    active = member & ((p - s0) % r == offset)
    num_keys = tl.where(active, (p - s0) // r + 1, 0)
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, num_keys)

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + j * stride_qh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    q = q * qk_scale
    rows = ANCHOR + tl.load(OFFSETS + b)
    k_new = K_NEW + b * stride_kb + c * stride_kh
    v_new = V_NEW + b * stride_kb + c * stride_kh
    slot_row = SLOTS + c.to(tl.int64) * table_length

    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < hi
        x = s0 + offset + offs_n * r
        is_new = x == p
        cached = valid & (x != p)
        slot = tl.load(slot_row + x % table_length, mask=cached, other=0).to(tl.int64)
        k_offs = slot[:, None] * HEAD_DIM + offs_d[None, :]
        v_offs = k_offs + num_slots * HEAD_DIM
        m_cached = cached[:, None] & mask_d[None, :]
        m_new = (valid & is_new)[:, None] & mask_d[None, :]
        k = tl.load(rows + k_offs, mask=m_cached, other=0.0).to(tl.float32)
        k += tl.load(k_new + offs_d[None, :] + 0 * offs_n[:, None], mask=m_new, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(valid, s, float("-inf"))
        m_next = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_next)
        prob = tl.exp2(s - m_next)
        v = tl.load(rows + v_offs, mask=m_cached, other=0.0).to(tl.float32)
        v += tl.load(v_new + offs_d[None, :] + 0 * offs_n[:, None], mask=m_new, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(prob, axis=0)
        acc = acc * alpha + tl.sum(prob[:, None] * v, axis=0)
        m_i = m_next

    state = pid.to(tl.int64) * num_items + item
    tl.store(M_OUT + state, m_i)
    tl.store(L_OUT + state, l_i)
    tl.store(ACC_OUT + state * BLOCK_D + offs_d, acc)

    # The new key's row: its previous holder's last query came before p, so no program reads it.
    if (item == 0) & (j % group == 0):
        new_slot = tl.load(slot_row + p % table_length).to(tl.int64)
        if new_slot >= 0:
            tl.store(rows + new_slot * HEAD_DIM + offs_d, tl.load(k_new + offs_d, mask=mask_d), mask=mask_d)
            tl.store(
                rows + (num_slots + new_slot) * HEAD_DIM + offs_d,
                tl.load(v_new + offs_d, mask=mask_d),
                mask=mask_d,
            )


@triton.jit
def _decode_reduce(
    M_IN,
    L_IN,
    ACC_IN,
    OUT,
    LSE,
    LENGTHS,
    num_heads,
    num_items,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_heads
    j = pid % num_heads
    items = tl.arange(0, BLOCK_I)
    in_range = items < num_items
    state = pid.to(tl.int64) * num_items + items
    m = tl.load(M_IN + state, mask=in_range, other=float("-inf"))
    m_max = tl.max(m, axis=0)
    live = m > float("-inf")
    weight = tl.where(live, tl.exp2(m - tl.where(live, m_max, 0.0)), 0.0)
    total = tl.sum(weight * tl.load(L_IN + state, mask=live, other=0.0), axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.load(ACC_IN + state[:, None] * BLOCK_D + offs_d[None, :], mask=live[:, None], other=0.0)
    merged = tl.sum(weight[:, None] * acc, axis=0)
    seen = total > 0
    out = tl.where(seen, merged / tl.where(seen, total, 1.0), 0.0)
    lse = tl.where(seen, (m_max + tl.log2(tl.where(seen, total, 1.0))) * LN2, float("-inf"))
    tl.store(
        OUT + b * stride_ob + j * stride_oh + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < HEAD_DIM
    )
    tl.store(LSE + pid, lse)
    if j == 0:
        tl.store(LENGTHS + b, tl.load(LENGTHS + b) + 1)


class _Plan:
    """Per-cache launch constants on the cache's device: pattern tables and the item list."""

    def __init__(self, cache: DilatedKVCache) -> None:
        pattern = cache.pattern
        heads = pattern.head_sets(cache.num_query_heads, cache.mode)
        items: list[tuple[int, int]] = []
        for i, (w, r) in enumerate(zip(pattern.segment_lengths, pattern.dilation_rates)):
            max_keys = (min(w, cache.table_length) - 1) // r + 1
            items.extend((i, s) for s in range(triton.cdiv(max_keys, _SPLIT)))
        device = cache.device

        def table(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=device)

        self.segment = table(list(pattern.segment_lengths))
        self.rate = table(list(pattern.dilation_rates))
        self.head_lo = table([hs.start for hs in heads])
        self.head_hi = table([hs.stop for hs in heads])
        self.item_pattern = table([i for i, _ in items])
        self.item_split = table([s for _, s in items])
        self.num_items = len(items)


_PLANS: weakref.WeakKeyDictionary[DilatedKVCache, _Plan] = weakref.WeakKeyDictionary()


def _plan(cache: DilatedKVCache) -> _Plan:
    plan = _PLANS.get(cache)
    if plan is None:
        plan = _PLANS[cache] = _Plan(cache)
    return plan


def decode_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: DilatedKVCache, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per sequence: ``q`` ``(b, 1, h, d)``, ``k, v`` ``(b, 1, h_kv, d)`` -> ``(out, lse)``.

    Appends ``k, v`` to ``cache`` and advances ``cache.lengths`` on the device; the caller has checked
    the shapes against the cache. float16, bfloat16 and float32 (float32 accumulation).
    """
    b, _, h, d = q.shape
    plan = _plan(cache)
    q, k, v = (x.contiguous() for x in (q, k, v))
    block_d = triton.next_power_of_2(d)
    m_state = torch.empty(b * h * plan.num_items, dtype=torch.float32, device=q.device)
    l_state = torch.empty_like(m_state)
    acc_state = torch.empty(b * h * plan.num_items * block_d, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    lse = torch.empty(b, 1, h, dtype=torch.float32, device=q.device)
    _decode_partial[(b * h, plan.num_items)](
        q,
        k,
        v,
        cache.anchor,
        cache.offsets,
        cache.slots,
        cache.lengths,
        plan.segment,
        plan.rate,
        plan.head_lo,
        plan.head_hi,
        plan.item_pattern,
        plan.item_split,
        m_state,
        l_state,
        acc_state,
        scale * LOG2E,
        q.stride(0),
        q.stride(2),
        k.stride(0),
        k.stride(2),
        h,
        h // cache.num_heads,
        cache.table_length,
        cache.num_slots,
        plan.num_items,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_N=_BLOCK_N,
        SPLIT=_SPLIT,
        num_warps=_WARPS,
    )
    _decode_reduce[(b * h,)](
        m_state,
        l_state,
        acc_state,
        out,
        lse,
        cache.lengths,
        h,
        plan.num_items,
        out.stride(0),
        out.stride(2),
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_I=triton.next_power_of_2(plan.num_items),
        num_warps=_WARPS,
    )
    return out, lse


__all__ = ["DTYPES", "decode_step"]
