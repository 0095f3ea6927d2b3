"""Predicates that read the batch index (or the head index) against the float64 oracle.

A block mask built once and broadcast over the batch (or the heads) is exact only for a predicate
that ignores that index. Predicates that read ``b`` get one mask per sequence, forward and
backward; ``per_head=False`` with a predicate that reads ``h`` is refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx.experimental.proxy_tensor as proxy_tensor
from dilated_attn.testing import relative_error
from dilated_attn_sparse import block_masks, block_sparse_attention, from_mask_mod, local_window
from dilated_attn_sparse.predicates import arguments_read
from dilated_attn_sparse.reference import dense_mask, masked_attention_reference

BATCH, N, HEADS, BLOCK = 3, 45, 2, 16
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}


def per_sequence_window(windows):
    def fn(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= windows[b]

    return fn


def key_padding(lengths):
    def fn(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    return fn


def direction_by_sequence(b, h, q_idx, kv_idx):
    return torch.where(b % 2 == 0, q_idx >= kv_idx, q_idx <= kv_idx)


def batch_and_head(b, h, q_idx, kv_idx):
    return ((q_idx + 2 * kv_idx + 3 * b + h) % 5 == 0) | (q_idx == kv_idx)


def _cases(n, device="cpu"):
    """Name -> (pattern, the same rule in plain Python over (b, h, i, j)) for 3 sequences of n tokens.

    Every one differs between sequences by whole blocks as well as inside blocks, so a mask of
    sequence 0 broadcast to the rest is wrong.
    """
    windows = [0, n // 6, 2 * n // 3]
    lengths = [n, 3 * n // 8, 3]
    window_table = torch.tensor(windows, dtype=torch.int32, device=device)
    length_table = torch.tensor(lengths, dtype=torch.int32, device=device)
    padding = from_mask_mod(key_padding(length_table), per_head=False)
    return {
        "window": (
            from_mask_mod(per_sequence_window(window_table), per_head=False),
            lambda b, h, i, j: abs(i - j) <= windows[b],
        ),
        "padding": (padding, lambda b, h, i, j: j < lengths[b]),
        "direction": (
            from_mask_mod(direction_by_sequence, per_head=False),
            lambda b, h, i, j: i >= j if b % 2 == 0 else i <= j,
        ),
        "batch_and_head": (
            from_mask_mod(batch_and_head),
            lambda b, h, i, j: (i + 2 * j + 3 * b + h) % 5 == 0 or i == j,
        ),
        "union_with_builtin": (
            local_window(2) | padding,
            lambda b, h, i, j: abs(i - j) <= 2 or j < lengths[b],
        ),
    }


CASES = _cases(N)


def _rule_mask(rule, batch, heads, n, causal):
    allowed = torch.zeros(batch, heads, n, n, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(n):
                for j in range(n):
                    allowed[b, h, i, j] = bool(rule(b, h, i, j)) and (not causal or j <= i)
    return allowed


def _check(
    pattern, allowed, *, causal, dtype, seed, batch=BATCH, n=N, heads=HEADS, block_size=BLOCK, device="cpu"
):
    fwd_tol, grad_tol = TOLERANCES[dtype]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(batch, n, heads, 16, generator=g).to(device, dtype).requires_grad_() for _ in range(3)
    )
    out, lse = block_sparse_attention(q, k, v, pattern, causal=causal, block_size=block_size, return_lse=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = masked_attention_reference(q64, k64, v64, allowed, return_lse=True)
    assert relative_error(out, ref_out) <= fwd_tol
    assert relative_error(lse, ref_lse) <= fwd_tol
    empty = torch.isneginf(ref_lse)
    grad_out = torch.randn(out.shape, generator=g).to(device, dtype)
    grad_lse = torch.randn(lse.shape, generator=g).to(device).masked_fill(empty, 0.0)
    loss = (out * grad_out).sum() + (lse.masked_fill(empty, 0.0) * grad_lse.to(lse.dtype)).sum()
    ref_loss = (ref_out * grad_out.double()).sum() + (
        ref_lse.masked_fill(empty, 0.0) * grad_lse.double()
    ).sum()
    loss.backward()
    ref_loss.backward()
    for name, ours, ref in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        err = relative_error(ours.grad, ref.grad)
        assert err <= grad_tol, f"d{name} relative error {err:.3e} > {grad_tol:g}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_batch_dependent_predicate_matches_oracle(name, causal):
    pattern, rule = CASES[name]
    allowed = _rule_mask(rule, BATCH, HEADS, N, causal)
    assert torch.equal(dense_mask(pattern, N, HEADS, causal=causal, batch=BATCH), allowed)
    _check(pattern, allowed, causal=causal, dtype=torch.float32, seed=sorted(CASES).index(name) + 10 * causal)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_batch_dependent_predicate_other_dtypes(dtype):
    pattern, rule = CASES["batch_and_head"]
    _check(pattern, _rule_mask(rule, BATCH, HEADS, N, True), causal=True, dtype=dtype, seed=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_batch_dependent_predicate_on_cuda(name, dtype):
    # The compiled kernels skip empty blocks and skip the predicate in full blocks: both must come
    # from each sequence's own mask. 300 tokens in 128-token blocks: full, partial and empty blocks.
    n = 300
    pattern, rule = _cases(n, "cuda")[name]
    allowed = _rule_mask(rule, BATCH, HEADS, n, True)
    _check(pattern, allowed, causal=True, dtype=dtype, seed=7, n=n, block_size=128, device="cuda")


def test_batch_size_change_builds_its_own_mask():
    # The cache key holds the batch for a batch-reading predicate: a smaller batch after a larger one
    # must not reuse (or slice) the larger batch's mask.
    pattern, rule = CASES["window"]
    for batch in (3, 2, 3):
        _check(
            pattern,
            _rule_mask(rule, batch, HEADS, N, False),
            causal=False,
            dtype=torch.float32,
            seed=batch,
            batch=batch,
        )


def test_mask_extents_follow_the_predicate():
    cpu = torch.device("cpu")
    assert arguments_read(CASES["window"][0].fn, cpu) == {"b", "q_idx", "kv_idx"}
    assert arguments_read(CASES["padding"][0].fn, cpu) == {"b", "kv_idx"}
    assert arguments_read(batch_and_head, cpu) == {"b", "h", "q_idx", "kv_idx"}
    mask = block_masks.get(CASES["window"][0], N, HEADS, batch=BATCH, block_size=BLOCK)
    assert tuple(mask.kv_num_blocks.shape[:2]) == (BATCH, 1)
    mask = block_masks.get(CASES["batch_and_head"][0], N, HEADS, batch=BATCH, block_size=BLOCK)
    assert tuple(mask.kv_num_blocks.shape[:2]) == (BATCH, HEADS)
    # Patterns that ignore b keep one mask for any batch: no memory per sequence.
    mask = block_masks.get(local_window(3), N, HEADS, batch=64, block_size=BLOCK)
    assert tuple(mask.kv_num_blocks.shape[:2]) == (1, 1)
    mask = block_masks.get(from_mask_mod(lambda b, h, q, kv: q >= kv), N, HEADS, batch=64, block_size=BLOCK)
    assert tuple(mask.kv_num_blocks.shape[:2]) == (1, HEADS)


@pytest.mark.parametrize(
    "fn",
    [
        lambda b, h, q, kv: (q - kv).abs() <= h,
        lambda b, h, q, kv: (h % 2 == 0) | (q == kv),
        lambda b, h, q, kv: torch.where(h > 0, q >= kv, q <= kv),
    ],
    ids=["window_by_head", "half_the_heads", "direction_by_head"],
)
def test_head_reading_predicate_declared_head_independent_is_refused(fn):
    q = torch.randn(2, N, HEADS, 8)
    message = r"per_head=False\): fn reads the head index h.*pass per_head=True"
    for pattern in (from_mask_mod(fn, per_head=False), local_window(1) | from_mask_mod(fn, per_head=False)):
        with pytest.raises(ValueError, match=message):
            block_sparse_attention(q, q, q, pattern, block_size=BLOCK)
        with pytest.raises(ValueError, match=message):
            pattern.density(N, num_heads=HEADS, block_size=BLOCK)
    # Declared per head, the same predicate runs (and is checked against the oracle).
    pattern = from_mask_mod(fn)
    _check(pattern, dense_mask(pattern, N, HEADS), causal=False, dtype=torch.float32, seed=5, batch=2)


def test_stats_refuse_batch_dependent_predicates():
    with pytest.raises(ValueError, match=r"reads the batch index b, so its sparsity differs per sequence"):
        CASES["padding"][0].density(N, block_size=BLOCK)
    with pytest.raises(ValueError, match=r"reads the batch index b: pass batch="):
        dense_mask(CASES["padding"][0], N, HEADS)


def test_untraceable_predicate_builds_every_extent(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("no tracing here")

    def rows_by_sequence(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + b) & (kv_idx >= q_idx - h)

    monkeypatch.setattr(proxy_tensor, "make_fx", refuse)
    pattern = from_mask_mod(rows_by_sequence, per_head=False)
    with pytest.warns(UserWarning, match=r"could not be traced.*no tracing here.*every sequence and head"):
        mask = block_masks.get(pattern, N, HEADS, batch=BATCH, block_size=BLOCK)
    assert tuple(mask.kv_num_blocks.shape[:2]) == (BATCH, HEADS)
    allowed = _rule_mask(lambda b, h, i, j: i - h <= j <= i + b, BATCH, HEADS, N, False)
    _check(pattern, allowed, causal=False, dtype=torch.float32, seed=8)
