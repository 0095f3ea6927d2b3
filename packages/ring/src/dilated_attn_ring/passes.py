"""The forward and backward passes of one rank (no autograd): local runs, then shared-segment pieces.

Forward: interior segments go through the core's ``local_forward``: the fused Triton kernels on
CUDA (strided loads, patterns merged in place, no gathered copies), the gather path where the kernels
cannot run. They need no communication, so the first step's transfer is posted before they run.
Each piece attends to itself (causal when asked), then to the pieces of the same segment that arrive
step by step, the next step's transfer in flight while the current one computes; per-piece results
merge by LSE, and the pieces merge into the local result by LSE. Besides its own pieces, a rank
holds the remote pieces of at most two steps (the one computing, the one in flight), whatever the
world size: a step's received pieces are freed once it has run.

Backward: the local runs go through ``local_backward`` and every piece block through
``attention_backward``, all with the *merged* output and LSE of their rows, so gradients stay exact
after the merge. Remote pieces are fetched again, and the key/value gradients they receive are sent
back to their owners in the same step order (the reduce-scatter of LongNet's distributed algorithm).
Between the passes the autograd node keeps ``q, k, v``, the merged ``out`` (input dtype) and ``lse``
(float32): what the fused backward needs, nothing per pattern or per piece. When one local run spans
the chunk (always when the local segments tile it), the chunk's output and gradients stay in the input
dtype and the pieces merge into them in place; only the pieces' own results and gradients are float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from dilated_attn.block_attention import compute_dtype
from dilated_attn.ops import (
    attention_backward,
    attention_forward,
    local_backward,
    local_forward,
    merge_lse,
)

from dilated_attn_ring.exchange import Transfer
from dilated_attn_ring.group import GroupInfo
from dilated_attn_ring.pieces import (
    add_heads,
    block_indices,
    gather,
    kv_blocks,
    kv_numel,
    merge_heads,
    merge_into,
    pack_kv,
    scatter_add,
    select_heads,
)
from dilated_attn_ring.plan import Piece, RankPlan, Step

Tensors = tuple[torch.Tensor, ...]


def _rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a contiguous chunk, contiguous (the chunk itself when it is all of it)."""
    return x if (start, stop) == (0, x.shape[1]) else x[:, start:stop].contiguous()


def _local_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RankPlan, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    m = q.shape[1]
    # One run over the whole chunk writes every row: keep its result in the input dtype (the fused
    # kernels write it directly) and merge the pieces into it in place, as the core merges its
    # patterns, instead of holding a float32 accumulator of the chunk (2x the output at 16 bits).
    out_dtype = q.dtype if plan.one_local_run else None
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    for run in plan.local:
        o, l = local_forward(
            _rows(q, run.start, run.stop),
            _rows(k, run.start, run.stop),
            _rows(v, run.start, run.stop),
            run.jobs,
            causal=causal,
            scale=scale,
            out_dtype=out_dtype,
        )
        if out is None and (run.start, run.stop) == (0, m):
            out, lse = o, l
            continue
        if out is None or lse is None:
            out, lse = _empty_result(q, v)
        merged_out, merged_lse = merge_lse(out[:, run.start : run.stop], lse[:, run.start : run.stop], o, l)
        out[:, run.start : run.stop] = merged_out
        lse[:, run.start : run.stop] = merged_lse
    if out is None or lse is None:
        out, lse = _empty_result(q, v)
    return out, lse


def _empty_result(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, m, h, _ = q.shape
    ct = compute_dtype(q.dtype)
    out = torch.zeros(b, m, h, v.shape[-1], dtype=ct, device=q.device)
    return out, torch.full((b, m, h), float("-inf"), dtype=ct, device=q.device)


def _post_kv(
    info: GroupInfo, step: Step, own_kv: list[torch.Tensor], batch: int, head_dim: int
) -> tuple[Transfer, list[torch.Tensor]]:
    like = own_kv[0]
    bufs = [
        torch.empty(kv_numel(receipt.remote, batch, head_dim), dtype=like.dtype, device=like.device)
        for receipt in step.receipts
    ]
    transfer = Transfer(
        info.group,
        [(own_kv[send.piece], send.peer) for send in step.sends],
        [(buf, receipt.peer) for buf, receipt in zip(bufs, step.receipts)],
    )
    return transfer, bufs


def _blocks(x: torch.Tensor, piece: Piece, indices: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [gather(x, index, len(blk.heads)) for blk, index in zip(piece.blocks, indices)]


def ring_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: RankPlan,
    info: GroupInfo,
    *,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged attention of this rank's rows: ``out`` ``(b, m, h, d)`` and ``lse`` ``(b, m, h)``.

    Contiguous ``(b, m, h, d)`` inputs; ``lse`` in float32 (float64 for float64 inputs), ``out`` in the
    input dtype when one local run covers the chunk (pieces then merge into it in place), else in
    ``lse``'s dtype.
    """
    b, _, h, d = q.shape
    indices = [block_indices(piece, h, q.device) for piece in plan.pieces]
    own_kv = [pack_kv(k, v, piece, idx) for piece, idx in zip(plan.pieces, indices)]
    # The first transfer is in flight while the local segments run: they need no communication.
    pending = _post_kv(info, plan.steps[0], own_kv, b, d) if plan.steps else None
    out, lse = _local_forward(q, k, v, plan, causal, scale)
    if not plan.pieces:
        return out, lse

    own_q = [_blocks(q, piece, idx) for piece, idx in zip(plan.pieces, indices)]
    acc: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for piece, qs, kv in zip(plan.pieces, own_q, own_kv):
        results = []
        for qb, kvb in zip(qs, kv_blocks(kv, piece, b, d)):
            o, l = attention_forward(qb, kvb[0], kvb[1], causal=causal, scale=scale)
            # Per-piece results are small: they accumulate in float32 (the LSE's dtype).
            results.append((o.to(lse.dtype), l.to(lse.dtype)))
        acc.append(results)

    for s, step in enumerate(plan.steps):
        assert pending is not None
        transfer, bufs = pending
        transfer.wait()
        pending = _post_kv(info, plan.steps[s + 1], own_kv, b, d) if s + 1 < len(plan.steps) else None
        _attend_received(step, bufs, own_q, acc, b, d, scale)
        # The received pieces die here, before the next step's buffers arrive.
        del transfer, bufs

    for idx, results in zip(indices, acc):
        for index, (o, l) in zip(idx, results):
            merge_into(out, lse, index, o, l)
    return out, lse


def _attend_received(
    step: Step,
    bufs: list[torch.Tensor],
    own_q: list[list[torch.Tensor]],
    acc: list[list[tuple[torch.Tensor, torch.Tensor]]],
    batch: int,
    head_dim: int,
    scale: float,
) -> None:
    """Merge the attention of this rank's piece queries to one step's received keys into ``acc``."""
    for receipt, buf in zip(step.receipts, bufs):
        remote = kv_blocks(buf, receipt.remote, batch, head_dim)
        for pairing in receipt.pairings:
            kvb = remote[pairing.other_block]
            o, l = attention_forward(
                select_heads(own_q[receipt.own][pairing.own_block], pairing.own_heads),
                select_heads(kvb[0], pairing.other_heads),
                select_heads(kvb[1], pairing.other_heads),
                causal=False,
                scale=scale,
            )
            acc_out, acc_lse = acc[receipt.own][pairing.own_block]
            merge_heads(acc_out, acc_lse, pairing.own_heads, o, l)


def _local_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    plan: RankPlan,
    causal: bool,
    scale: float,
) -> Tensors:
    m = q.shape[1]
    grad_dtype = q.dtype if plan.one_local_run else None
    grads: Tensors | None = None
    for run in plan.local:
        a, z = run.start, run.stop
        g = local_backward(
            _rows(dout, a, z),
            _rows(q, a, z),
            _rows(k, a, z),
            _rows(v, a, z),
            _rows(out, a, z),
            _rows(lse, a, z),
            run.jobs,
            causal=causal,
            scale=scale,
            dlse=None if dlse is None else _rows(dlse, a, z),
            grad_dtype=grad_dtype,
        )
        if grads is None and (a, z) == (0, m):
            grads = g
            continue
        if grads is None:
            grads = _zero_grads(q)
        for acc, part in zip(grads, g):
            acc[:, a:z] += part
    return _zero_grads(q) if grads is None else grads


def _zero_grads(q: torch.Tensor) -> Tensors:
    ct = compute_dtype(q.dtype)
    return tuple(torch.zeros(q.shape, dtype=ct, device=q.device) for _ in range(3))


@dataclass(frozen=True)
class _QuerySide:
    """What the query rows of one block bring to a backward: ``(b, H', count, ...)`` blocks."""

    dout: torch.Tensor
    q: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    dlse: torch.Tensor | None

    @classmethod
    def gather(
        cls,
        dout: torch.Tensor,
        q: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        dlse: torch.Tensor | None,
        index: torch.Tensor,
        heads: int,
    ) -> _QuerySide:
        return cls(
            gather(dout, index, heads),
            gather(q, index, heads),
            gather(out, index, heads),
            gather(lse, index, heads),
            None if dlse is None else gather(dlse, index, heads),
        )

    def heads(self, positions: tuple[int, ...] | None) -> _QuerySide:
        """The same rows for the heads at ``positions`` of the block (all for ``None``)."""
        if positions is None:
            return self
        return _QuerySide(
            select_heads(self.dout, positions),
            select_heads(self.q, positions),
            select_heads(self.out, positions),
            select_heads(self.lse, positions),
            None if self.dlse is None else select_heads(self.dlse, positions),
        )


def ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    plan: RankPlan,
    info: GroupInfo,
    *,
    causal: bool,
    scale: float,
) -> Tensors:
    """Gradients ``(dq, dk, dv)`` of this rank's chunk, given the merged ``out`` and ``lse``.

    Every rank of the group must call it (the transfers are collective); results in float32
    (float64 for float64 inputs), or in the input dtype when one local run covers the chunk.
    """
    b, _, h, d = q.shape
    indices = [block_indices(piece, h, q.device) for piece in plan.pieces]
    own_kv = [pack_kv(k, v, piece, idx) for piece, idx in zip(plan.pieces, indices)]
    pending = _post_kv(info, plan.steps[0], own_kv, b, d) if plan.steps else None
    dq, dk, dv = _local_backward(dout, q, k, v, out, lse, dlse, plan, causal, scale)
    if not plan.pieces:
        return dq, dk, dv
    # The pieces' gradients accumulate in float32 (they are small); the chunk's may be 16-bit.
    ct = compute_dtype(q.dtype)

    queries = [
        [
            _QuerySide.gather(dout, q, out, lse, dlse, index, len(blk.heads))
            for blk, index in zip(piece.blocks, idx)
        ]
        for piece, idx in zip(plan.pieces, indices)
    ]
    dq_p = [[torch.zeros(side.q.shape, dtype=ct, device=q.device) for side in sides] for sides in queries]
    dkv_p = [torch.zeros(kv.shape, dtype=ct, device=q.device) for kv in own_kv]

    for p, piece in enumerate(plan.pieces):
        grads = kv_blocks(dkv_p[p], piece, b, d)
        for bi, kvb in enumerate(kv_blocks(own_kv[p], piece, b, d)):
            side = queries[p][bi]
            gq, gk, gv = attention_backward(
                side.dout,
                side.q,
                kvb[0],
                kvb[1],
                side.out,
                side.lse,
                causal=causal,
                scale=scale,
                dlse=side.dlse,
            )
            dq_p[p][bi] += gq.to(ct)
            grads[bi][0] += gk.to(ct)
            grads[bi][1] += gv.to(ct)

    returning: tuple[Transfer, Step, list[torch.Tensor]] | None = None
    for s, step in enumerate(plan.steps):
        assert pending is not None
        transfer, bufs = pending
        transfer.wait()
        pending = _post_kv(info, plan.steps[s + 1], own_kv, b, d) if s + 1 < len(plan.steps) else None
        grads_out = _backward_received(step, bufs, queries, dq_p, b, d, ct, scale)
        del transfer, bufs
        grads_in = [torch.empty_like(dkv_p[send.piece]) for send in step.sends]
        sent_back = Transfer(
            info.group,
            [(g, receipt.peer) for g, receipt in zip(grads_out, step.receipts)],
            [(g, send.peer) for g, send in zip(grads_in, step.sends)],
        )
        if returning is not None:
            _collect(returning, dkv_p)
        returning = (sent_back, step, grads_in)
    if returning is not None:
        _collect(returning, dkv_p)

    for piece, idx, gqs, gkv in zip(plan.pieces, indices, dq_p, dkv_p):
        for index, gq, kvb in zip(idx, gqs, kv_blocks(gkv, piece, b, d)):
            scatter_add(dq, index, gq)
            scatter_add(dk, index, kvb[0])
            scatter_add(dv, index, kvb[1])
    return dq, dk, dv


def _backward_received(
    step: Step,
    bufs: list[torch.Tensor],
    queries: list[list[_QuerySide]],
    dq_p: list[list[torch.Tensor]],
    batch: int,
    head_dim: int,
    grad_dtype: torch.dtype,
    scale: float,
) -> list[torch.Tensor]:
    """Backward through one step's received keys: adds into ``dq_p``, returns their key/value gradients."""
    grads_out = []
    for receipt, buf in zip(step.receipts, bufs):
        remote = kv_blocks(buf, receipt.remote, batch, head_dim)
        grad_buf = torch.zeros(buf.shape, dtype=grad_dtype, device=buf.device)
        remote_grads = kv_blocks(grad_buf, receipt.remote, batch, head_dim)
        for pairing in receipt.pairings:
            side = queries[receipt.own][pairing.own_block].heads(pairing.own_heads)
            kvb = remote[pairing.other_block]
            gq, gk, gv = attention_backward(
                side.dout,
                side.q,
                select_heads(kvb[0], pairing.other_heads),
                select_heads(kvb[1], pairing.other_heads),
                side.out,
                side.lse,
                causal=False,
                scale=scale,
                dlse=side.dlse,
            )
            add_heads(dq_p[receipt.own][pairing.own_block], pairing.own_heads, gq)
            add_heads(remote_grads[pairing.other_block][0], pairing.other_heads, gk)
            add_heads(remote_grads[pairing.other_block][1], pairing.other_heads, gv)
        grads_out.append(grad_buf)
    return grads_out


def _collect(returning: tuple[Transfer, Step, list[torch.Tensor]], dkv_p: list[torch.Tensor]) -> None:
    """Wait for the key/value gradients sent back for this rank's pieces and add them."""
    transfer, step, grads_in = returning
    transfer.wait()
    for send, g in zip(step.sends, grads_in):
        dkv_p[send.piece] += g
