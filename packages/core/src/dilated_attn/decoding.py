"""Incremental causal dilated attention over a ``DilatedKVCache`` (SPEC 1e).

``dilated_attention_with_kvcache(q, k, v, cache)`` appends the ``t`` new keys and values of every
sequence and returns the causal attention of the ``t`` new queries, equal to the causal forward on
the whole sequence at those positions. Three paths, one result:

- a first chunk (every sequence empty) is a causal forward on the chunk alone: the fused kernels;
- a one-token step on CUDA is the Triton decode kernel (``dilated_attn.kernels.decode``);
- anything else (later chunks, the CPU) attends over a window of the cached rows plus the chunk with
  the multiplicity bias ``log c`` of SPEC 1a, written out per position.
"""

from __future__ import annotations

import torch

from dilated_attn.kvcache import DilatedKVCache
from dilated_attn.pattern import DilationPattern

# Scores of the portable path are computed for at most this many (head, query, key) entries at once.
_WINDOW_ENTRIES = 1 << 25


def _check(q: object, k: object, v: object, cache: object) -> int:
    """Validate the call at the boundary; returns ``t``."""
    if not isinstance(cache, DilatedKVCache):
        raise TypeError(f"cache must be a DilatedKVCache, got {type(cache).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name}.shape={tuple(x.shape)} must have rank 4: (batch, t, heads, head_dim)")
        if x.dtype != cache.dtype:
            raise TypeError(f"{name}.dtype={x.dtype} must equal the cache's dtype {cache.dtype}")
        if x.device != cache.device:
            raise ValueError(f"{name}.device={x.device} must equal the cache's device {cache.device}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    b, t = q.shape[:2]
    want_q = (cache.batch_size, t, cache.num_query_heads, cache.head_dim)
    want_kv = (cache.batch_size, t, cache.num_heads, cache.head_dim)
    if tuple(q.shape) != want_q or t < 1:
        raise ValueError(
            f"q.shape={tuple(q.shape)} must be (batch_size, t >= 1, num_query_heads, head_dim)={want_q} "
            "for this cache"
        )
    for name, x in (("k", k), ("v", v)):
        if tuple(x.shape) != want_kv:
            raise ValueError(
                f"{name}.shape={tuple(x.shape)} must be (batch_size, t, num_heads, head_dim)={want_kv}: "
                "the K/V heads the cache stores"
            )
    if not cache.held():
        raise ValueError("cache holds released sequences: reset(index) starts them again before attention")
    if cache.max_length is not None and max(cache._host_lengths) + t > cache.max_length:
        raise ValueError(
            f"appending t={t} tokens to sequences of lengths {cache._host_lengths} passes the cache's "
            f"max_length={cache.max_length}"
        )
    return t


def dilated_attention_with_kvcache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: DilatedKVCache,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Append ``k, v`` ``(b, t, h_kv, d)`` to ``cache``; causal attention of ``q`` ``(b, t, h, d)``.

    Query ``u`` of sequence ``i`` sits at position ``cache.length[i] + u``. Returns ``out``
    ``(b, t, h, d)`` in the input dtype and, with ``return_lse``, ``lse`` ``(b, t, h)`` float32
    (float64 for float64 inputs); rows with no key give 0 and ``-inf``. No gradients flow into the cache.
    """
    t = _check(q, k, v, cache)
    d = cache.head_dim
    if scale is None:
        scale = d**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale={scale!r} must be a positive float (or None: head_dim ** -0.5)")
    scale = float(scale)
    if t == 1 and q.is_cuda and q.dtype != torch.float64:
        from dilated_attn.kernels.decode import decode_step

        out, lse = decode_step(q, k, v, cache, scale)
    elif t > 1 and not any(cache._host_lengths):
        out, lse = _first_chunk(q, k, v, cache, scale)
    else:
        out, lse = _window_attention(q, k, v, cache, scale)
    cache._advance(t)
    return (out, lse) if return_lse else out


def _first_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: DilatedKVCache, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from dilated_attn.functional import dilated_attention

    group = cache.num_query_heads // cache.num_heads
    k_rep, v_rep = (x.repeat_interleave(group, dim=2) for x in (k, v))
    with torch.no_grad():
        out, lse = dilated_attention(
            q, k_rep, v_rep, cache.pattern, mode=cache.mode, causal=True, scale=scale, return_lse=True
        )
    if q.dtype == torch.float64:
        lse = lse.double()
    _store(k, v, cache)
    return out, lse


def _store(k: torch.Tensor, v: torch.Tensor, cache: DilatedKVCache) -> None:
    """Write the chunk's rows that a later query still sees (the others may share a slot with them)."""
    t = k.shape[1]
    for i in range(cache.batch_size):
        length = cache._host_lengths[i]
        pos = torch.arange(length, length + t, device=cache.device)
        phase = pos % cache.table_length
        slots = cache.slots[:, phase]  # (h_kv, t)
        ends = pos - phase + cache.ends[:, phase]
        keep = (slots >= 0) & (ends > length + t)
        rows = cache.storage(i)
        rows[0, slots[keep].long()] = k[i].transpose(0, 1)[keep]
        rows[1, slots[keep].long()] = v[i].transpose(0, 1)[keep]
    cache.lengths += t


def multiplicity(
    pattern: DilationPattern, mode: str, num_heads: int, pos_q: torch.Tensor, pos_k: torch.Tensor
) -> torch.Tensor:
    """``c`` of SPEC 1a, causal, for query positions ``pos_q`` and key positions ``pos_k``: ``(h, nq, nk)``
    int32, the number of patterns through which each query head reaches each key (0: it does not)."""
    h = num_heads
    heads = torch.arange(h, device=pos_q.device)
    count = torch.zeros(h, pos_q.numel(), pos_k.numel(), dtype=torch.int32, device=pos_q.device)
    causal = pos_k[None, :] <= pos_q[:, None]
    for (w, r), head_set in zip(
        zip(pattern.segment_lengths, pattern.dilation_rates), pattern.head_sets(h, mode)
    ):
        # A sequence shorter than w is one segment [0, n): the same as segment 0 of length w.
        same = (pos_q // w)[:, None] == (pos_k // w)[None, :]
        offset = heads % r
        sel_q = ((pos_q % w) % r)[None, :] == offset[:, None]  # (h, nq)
        sel_k = ((pos_k % w) % r)[None, :] == offset[:, None]  # (h, nk)
        member = torch.zeros(h, dtype=torch.bool, device=pos_q.device)
        member[head_set.start : head_set.stop] = True
        allowed = (same & causal)[None] & sel_q[:, :, None] & sel_k[:, None, :] & member[:, None, None]
        count += allowed.to(torch.int32)
    return count


def window_start(pattern: DilationPattern, first_query: int) -> int:
    """The earliest key position a causal query at ``first_query`` or later can see: the earliest
    start of its segments (every key it sees lies in one of them)."""
    return min(first_query // w * w for w in pattern.segment_lengths)


def attention_at_positions(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_q: torch.Tensor,
    pos_k: torch.Tensor,
    pattern: DilationPattern,
    mode: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal dilated attention of queries ``q`` ``(h, nq, d)`` at positions ``pos_q`` over keys and
    values ``(h_kv, nk, d)`` at positions ``pos_k`` (``h_kv`` dividing ``h``), which must include every
    key the queries reach: scores carry the bias ``log c`` of SPEC 1a, so keys that no pattern reaches
    get no weight and keys reached twice count twice. Differentiable.

    Returns ``out`` ``(h, nq, d)`` and ``lse`` ``(h, nq)`` in float32 (float64 for float64 inputs);
    a query that reaches no key gets 0 and ``-inf``.
    """
    h, nq, d = q.shape
    h_kv, nk = k.shape[0], k.shape[1]
    group = h // h_kv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # The g query heads of a K/V head multiply its keys as one (g * nq)-row block: no K/V repeat.
    q_acc = q.to(acc).reshape(h_kv, group * nq, d)
    k_acc, v_acc = k.to(acc), v.to(acc)
    step = max(1, _WINDOW_ENTRIES // (h * max(1, nk)))
    outs, lses = [], []
    for u0 in range(0, nq, step):
        u1 = min(nq, u0 + step)
        rows = q_acc.view(h_kv, group, nq, d)[:, :, u0:u1].reshape(h_kv, group * (u1 - u0), d)
        count = multiplicity(pattern, mode, h, pos_q[u0:u1], pos_k)
        scores = (scale * (rows @ k_acc.transpose(1, 2))).view(h, u1 - u0, nk) + torch.log(count.to(acc))
        # Queries that reach no key: scores replaced before the softmax, so that no -inf - -inf (NaN)
        # reaches the gradients; their output is 0 and their LSE -inf.
        reach = (count > 0).any(dim=-1, keepdim=True)
        scores = torch.where(reach, scores, 0.0)
        row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.where(reach, torch.exp(scores - row_lse), 0.0)
        out = probs.view(h_kv, group * (u1 - u0), nk) @ v_acc
        outs.append(out.view(h, u1 - u0, d))
        lses.append(torch.where(reach, row_lse, float("-inf")).squeeze(-1))
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def _window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: DilatedKVCache, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's queries over the window of positions any of them can see, bias ``log c``."""
    b, t, h, d = q.shape
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    lse = torch.empty(b, t, h, dtype=acc_dtype, device=q.device)
    for i in range(b):
        length = cache._host_lengths[i]
        first = window_start(cache.pattern, length)
        old = torch.arange(first, length, device=q.device)
        phase = old % cache.table_length
        slots = cache.slots[:, phase].long()  # (h_kv, n_old); -1: never stored
        # A row whose last query came before ``length`` may already hold a later key's data (or none).
        alive = (slots >= 0) & (old - phase + cache.ends[:, phase] > length)
        rows = cache.storage(i)
        keys = []
        for half, new in ((0, k), (1, v)):
            # Dead rows are selected away, never multiplied away: they may hold anything, NaN included.
            cached = torch.where(alive[..., None], rows[half][slots.clamp(min=0)], 0)  # (h_kv, n_old, d)
            keys.append(torch.cat([cached, new[i].transpose(0, 1)], dim=1))
        o, l = attention_at_positions(
            q[i].transpose(0, 1),
            keys[0],
            keys[1],
            torch.arange(length, length + t, device=q.device),
            torch.arange(first, length + t, device=q.device),
            cache.pattern,
            cache.mode,
            scale,
        )
        out[i] = o.transpose(0, 1).to(q.dtype)
        lse[i] = l.transpose(0, 1)
    _store(k, v, cache)
    return out, lse


__all__ = ["dilated_attention_with_kvcache"]
