"""Incremental decoding over ``DilatedKVCache`` against the float64 oracle's causal forward."""

from __future__ import annotations

import math

import pytest
import torch
from dilated_attn.decoding import dilated_attention_with_kvcache
from dilated_attn.kvcache import DilatedKVCache, KVCacheBudgetError
from dilated_attn.pattern import DilationPattern
from dilated_attn.pool import PythonBufferPool
from dilated_attn.reference import dilated_attention_reference, multiplicity
from dilated_attn.testing import TOLERANCES, relative_error

# (segment_lengths, dilation_rates): odd lengths, r not dividing w, no r = 1, w past the context.
PATTERNS = [
    ([4, 8], [1, 2]),
    ([5, 7], [2, 3]),
    ([3, 6, 12], [1, 2, 4]),
    ([6, 9], [4, 2]),
    ([8, 64], [1, 4]),
]


def _inputs(b, n, h, h_kv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=g).to(dtype)
    k = torch.randn(b, n, h_kv, d, generator=g).to(dtype)
    v = torch.randn(b, n, h_kv, d, generator=g).to(dtype)
    return q, k, v


def _oracle(q, k, v, w, r, mode):
    group = q.shape[2] // k.shape[2]
    k_rep, v_rep = (x.double().repeat_interleave(group, dim=2) for x in (k, v))
    return dilated_attention_reference(
        q.double(), k_rep, v_rep, w, r, mode=mode, causal=True, return_lse=True
    )


def _poison(cache):
    """Fill the storage with NaN: a row read before it is written, or after it died, shows up."""
    for i in range(cache.batch_size):
        cache.storage(i).fill_(float("nan"))
    return cache


def _decode(q, k, v, cache, chunks):
    """Feed ``q, k, v`` in chunks of the given sizes; concatenated outputs and lses."""
    outs, lses, start = [], [], 0
    for t in chunks:
        out, lse = dilated_attention_with_kvcache(
            q[:, start : start + t], k[:, start : start + t], v[:, start : start + t], cache, return_lse=True
        )
        outs.append(out)
        lses.append(lse)
        start += t
    return torch.cat(outs, 1), torch.cat(lses, 1)


def _chunks(n, seed):
    g = torch.Generator().manual_seed(seed)
    sizes, total = [], 0
    while total < n:
        t = 1 if torch.rand((), generator=g) < 0.6 else int(torch.randint(2, 9, (), generator=g))
        t = min(t, n - total)
        sizes.append(t)
        total += t
    return sizes


@pytest.mark.parametrize("mode", ["longnet", "head_groups"])
@pytest.mark.parametrize("w,r", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoding_matches_causal_oracle(w, r, mode, dtype):
    b, n, h, h_kv, d = 2, 37, 6, 3, 8
    q, k, v = _inputs(b, n, h, h_kv, d, dtype, seed=len(w) + r[-1])
    ref, ref_lse = _oracle(q, k, v, w, r, mode)
    cache = DilatedKVCache(
        w,
        r,
        batch_size=b,
        num_heads=h_kv,
        num_query_heads=h,
        head_dim=d,
        dtype=dtype,
        device="cpu",
        mode=mode,
    )
    out, lse = _decode(q, k, v, _poison(cache), _chunks(n, seed=n))
    tol = TOLERANCES[dtype][0]
    assert out.dtype == dtype
    assert relative_error(out, ref) <= tol
    assert relative_error(lse, ref_lse) <= tol
    assert torch.all(out[torch.isneginf(ref_lse)] == 0)
    assert cache.length.tolist() == [n] * b


@pytest.mark.parametrize("chunks", [[1] * 23, [23], [5, 1, 1, 9, 1, 7]])
def test_chunk_sizes_agree(chunks):
    w, r = [4, 6, 10], [1, 2, 3]
    q, k, v = _inputs(1, 23, 4, 2, 8, torch.float64, seed=3)
    ref, _ = _oracle(q, k, v, w, r, "longnet")
    cache = DilatedKVCache(
        w, r, batch_size=1, num_heads=2, num_query_heads=4, head_dim=8, dtype=torch.float64, device="cpu"
    )
    out, _ = _decode(q, k, v, _poison(cache), chunks)
    assert relative_error(out, ref) <= TOLERANCES[torch.float64][0]


@pytest.mark.parametrize("mode", ["longnet", "head_groups"])
def test_batch_of_different_lengths(mode):
    """Sequence 1 restarts midway: its tokens after the restart are a sequence of their own."""
    w, r = [5, 7], [2, 3]
    b, n, h, d = 3, 30, 4, 8
    q, k, v = _inputs(b, n, h, h, d, torch.float64, seed=11)
    cache = DilatedKVCache(
        w, r, batch_size=b, num_heads=h, head_dim=d, dtype=torch.float64, device="cpu", mode=mode
    )
    restart = 13
    first, _ = _decode(q[:, :restart], k[:, :restart], v[:, :restart], _poison(cache), [4, 1, 1, 7])
    cache.reset(1)
    assert cache.length.tolist() == [restart, 0, restart]
    second, _ = _decode(q[:, restart:], k[:, restart:], v[:, restart:], cache, [1, 1, 3, 1, 10, 1])
    out = torch.cat([first, second], 1)
    tol = TOLERANCES[torch.float64][0]
    for i in (0, 2):
        ref, _ = _oracle(q[i : i + 1], k[i : i + 1], v[i : i + 1], w, r, mode)
        assert relative_error(out[i : i + 1], ref) <= tol
    ref1, _ = _oracle(q[1:2, restart:], k[1:2, restart:], v[1:2, restart:], w, r, mode)
    assert relative_error(out[1:2, restart:], ref1) <= tol


def _peak_visible_rows(w, r, mode, h, h_kv, n):
    """The most (K/V head, position) rows that some query at or after position p still sees, over p."""
    c = multiplicity(n, h, DilationPattern(w, r), mode, causal=True) > 0  # (h, query, key)
    group = h // h_kv
    per_kv = c.view(h_kv, group, n, n).any(dim=1)  # (h_kv, query, key)
    # seen_later[c, p, x]: some query at or after p sees x
    seen_later = per_kv.flip(1).cummax(dim=1).values.flip(1)
    pos = torch.arange(n)
    alive = seen_later & (pos[None, None, :] <= pos[None, :, None])
    return int(alive.sum(dim=(0, 2)).max())


@pytest.mark.parametrize("mode", ["longnet", "head_groups"])
@pytest.mark.parametrize("w,r", PATTERNS[:4] + [([4, 8, 16], [1, 2, 4])])
@pytest.mark.parametrize("h,h_kv", [(4, 4), (6, 2), (5, 5)])
def test_cache_holds_exactly_the_visible_rows(w, r, mode, h, h_kv):
    d = 4
    period = math.lcm(*w)
    peak = _peak_visible_rows(w, r, mode, h, h_kv, 3 * period)
    cache = DilatedKVCache(
        w,
        r,
        batch_size=2,
        num_heads=h_kv,
        num_query_heads=h,
        head_dim=d,
        dtype=torch.float32,
        device="cpu",
        mode=mode,
    )
    exact = 2 * peak * 2 * d * 4  # two sequences, keys and values, float32
    assert exact <= cache.nbytes <= 1.05 * exact


def test_cache_size_independent_of_context():
    w, r = [4, 8, 16], [1, 2, 4]
    kw = dict(batch_size=1, num_heads=4, head_dim=4, dtype=torch.float32, device="cpu")
    sizes = {m: DilatedKVCache(w, r, max_length=m, **kw).nbytes for m in (16, 64, 1000, None)}
    assert len(set(sizes.values())) == 1
    # Longer segments than the context cost only the context's rows.
    short = DilatedKVCache(w, r, max_length=6, **kw)
    assert short.nbytes < sizes[None]
    assert short.num_slots == _peak_visible_rows(w, r, "longnet", 4, 4, 6)


def test_long_segment_beyond_max_length_decodes_exactly():
    w, r = [4, 64], [1, 3]
    q, k, v = _inputs(1, 20, 3, 3, 8, torch.float64, seed=5)
    ref, _ = _oracle(q, k, v, w, r, "longnet")
    cache = DilatedKVCache(
        w, r, batch_size=1, num_heads=3, head_dim=8, dtype=torch.float64, device="cpu", max_length=20
    )
    out, _ = _decode(q, k, v, cache, [3] + [1] * 17)
    assert relative_error(out, ref) <= TOLERANCES[torch.float64][0]
    with pytest.raises(ValueError, match="max_length=20"):
        dilated_attention_with_kvcache(q[:, :1], k[:, :1], v[:, :1], cache)


def test_pool_budget_bounds_the_cache():
    kw = dict(batch_size=2, num_heads=4, head_dim=16, dtype=torch.float32, device="cpu")
    pool = PythonBufferPool(budget_bytes=1 << 20)
    with DilatedKVCache([64, 128], [1, 2], pool=pool, **kw) as cache:
        assert pool.stats()["pinned_bytes"] >= cache.nbytes > 0
        cache.release(0)
        assert cache.nbytes == pool.stats()["requested_bytes"]
        cache.reset(0)
        with pytest.raises(KVCacheBudgetError, match="budget_bytes=1048576"):
            DilatedKVCache([2048, 4096], [1, 2], pool=pool, **kw)
    assert pool.stats()["pinned_bytes"] == 0 and pool.stats()["in_use_bytes"] == 0


def test_released_sequence_is_refused():
    cache = DilatedKVCache([4], [1], batch_size=2, num_heads=1, head_dim=4, dtype=torch.float32, device="cpu")
    cache.release(1)
    x = torch.zeros(2, 1, 1, 4)
    with pytest.raises(ValueError, match="released"):
        dilated_attention_with_kvcache(x, x, x, cache)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=torch.zeros(2, 1, 3, 4)), "num_query_heads"),
        (dict(k=torch.zeros(2, 1, 2, 4)), "num_heads"),
        (dict(q=torch.zeros(2, 1, 2, 4, dtype=torch.float64)), "dtype"),
        (dict(scale=-1.0), "scale"),
    ],
)
def test_bad_arguments(kwargs, match):
    cache = DilatedKVCache(
        [4], [1], batch_size=2, num_heads=1, num_query_heads=2, head_dim=4, dtype=torch.float32, device="cpu"
    )
    args = dict(q=torch.zeros(2, 1, 2, 4), k=torch.zeros(2, 1, 1, 4), v=torch.zeros(2, 1, 1, 4), cache=cache)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        dilated_attention_with_kvcache(**args)


def test_constructor_checks():
    with pytest.raises(ValueError, match="num_query_heads=5"):
        DilatedKVCache(
            [4],
            [1],
            batch_size=1,
            num_heads=2,
            num_query_heads=5,
            head_dim=4,
            dtype=torch.float32,
            device="cpu",
        )
    with pytest.raises(ValueError, match="max_length"):
        DilatedKVCache(
            [1000003, 999983],
            [1, 1],
            batch_size=1,
            num_heads=1,
            head_dim=4,
            dtype=torch.float32,
            device="cpu",
        )
