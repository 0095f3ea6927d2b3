"""block_sparse_attention against the dense masked float64 oracle: forward, LSE and gradients."""

from __future__ import annotations

import pytest
import sparse_rules as rules
import torch
from dilated_attn.testing import relative_error
from dilated_attn_sparse import (
    block_masks,
    block_sparse_attention,
    dilated_blocks,
    from_mask_mod,
    global_local,
    local_window,
    random_blocks,
    strided,
)
from dilated_attn_sparse.reference import masked_attention_reference

BLOCK = 16
N = 77  # not a multiple of BLOCK: the last block is partial
HEADS = 3


def _user_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    return ((q_idx + 2 * kv_idx + h) % 7 == 0) | (q_idx == kv_idx)


def _user_rule(h: int, i: int, j: int) -> bool:
    return (i + 2 * j + h) % 7 == 0 or i == j


def _cases() -> dict[str, tuple[object, rules.Rule]]:
    table = random_blocks(0.3, seed=4, block_size=BLOCK)
    return {
        "local_window": (local_window(9), rules.local(9)),
        "dilated_blocks": (dilated_blocks(3, 2, BLOCK), rules.dilated(3, 2, BLOCK)),
        "global_local": (global_local(4, 6), rules.global_local(4, 6)),
        "strided": (strided(20), rules.strided(20)),
        "random_blocks": (table, rules.table(table.table(N), BLOCK)),
        "from_mask_mod": (from_mask_mod(_user_mask), _user_rule),
        "union": (
            local_window(3) | dilated_blocks(4, 4, BLOCK),
            rules.any_of(rules.local(3), rules.dilated(4, 4, BLOCK)),
        ),
        "intersection": (
            global_local(5, 30) & strided(3),
            rules.all_of(rules.global_local(5, 30), rules.strided(3)),
        ),
    }


CASES = _cases()
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}


def _check(pattern, rule, *, causal, dtype, n=N, heads=HEADS, block_size=BLOCK, seed=0, batch=2):
    fwd_tol, grad_tol = TOLERANCES[dtype]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, heads, 16, generator=g).to(dtype).requires_grad_() for _ in range(3))
    out, lse = block_sparse_attention(q, k, v, pattern, causal=causal, block_size=block_size, return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (batch, n, heads) and lse.dtype == torch.float32

    allowed = rules.dense(rule, n, heads, causal=causal)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = masked_attention_reference(q64, k64, v64, allowed, return_lse=True)
    assert relative_error(out, ref_out) <= fwd_tol
    assert relative_error(lse, ref_lse) <= fwd_tol
    empty = torch.isneginf(ref_lse)
    assert torch.all(out.detach()[empty] == 0)

    # The loss reaches lse too, so its gradient path is checked with the output's.
    grad_out = torch.randn(out.shape, generator=g).to(dtype)
    grad_lse = torch.randn(lse.shape, generator=g).masked_fill(empty, 0.0)
    loss = (out * grad_out).sum() + (lse.masked_fill(empty, 0.0) * grad_lse).sum()
    ref_loss = (ref_out * grad_out.double()).sum() + (
        ref_lse.masked_fill(empty, 0.0) * grad_lse.double()
    ).sum()
    loss.backward()
    ref_loss.backward()
    for name, ours, ref in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        assert torch.isfinite(ours.grad).all(), f"d{name} has non-finite entries"
        err = relative_error(ours.grad, ref.grad)
        assert err <= grad_tol, f"d{name} relative error {err:.3e} > {grad_tol:g}"
    return empty


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_oracle_fp32(name, causal):
    pattern, rule = CASES[name]
    _check(pattern, rule, causal=causal, dtype=torch.float32, seed=hash((name, causal)) % 2**31)


def test_rows_without_keys_give_zero_and_minus_inf():
    # Dilation 2 leaves every other block of queries with no key at all.
    empty = _check(dilated_blocks(2, 2, BLOCK), rules.dilated(2, 2, BLOCK), causal=False, dtype=torch.float32)
    assert empty.any() and not empty.all()


def test_bfloat16_within_bound():
    pattern, rule = CASES["union"]
    _check(pattern, rule, causal=True, dtype=torch.bfloat16, seed=11)


def test_default_block_size_with_partial_block():
    # n = 200 with the default 128-token blocks: one full and one partial block per side.
    _check(
        local_window(40),
        rules.local(40),
        causal=False,
        dtype=torch.float32,
        n=200,
        heads=2,
        block_size=128,
        batch=1,
        seed=5,
    )


def test_returns_only_out_without_lse():
    q = torch.randn(1, 40, 2, 8)
    out = block_sparse_attention(q, q, q, local_window(4), block_size=16)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


def test_scale_is_applied():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 40, 2, 8, generator=g) for _ in range(3))
    out = block_sparse_attention(q, k, v, local_window(5), scale=0.7, block_size=16)
    ref = masked_attention_reference(q, k, v, rules.dense(rules.local(5), 40, 2), scale=0.7)
    assert relative_error(out, ref) <= 1e-5


@pytest.mark.parametrize("n, covering", [(64, 128), (1, 128), (129, 256), (300, 512)])
@pytest.mark.parametrize("block_size", [2**20, 2**40, 2**62])
def test_huge_block_size_is_capped_at_the_sequence(n, covering, block_size):
    # One block covering the sequence gives the same result as any larger block, without the
    # block_size ** 2 mask FlexAttention would evaluate for it.
    mask = block_masks.get(local_window(5), n, 2, block_size=block_size)
    assert mask.BLOCK_SIZE == (covering, covering)
    _check(
        local_window(5),
        rules.local(5),
        causal=True,
        dtype=torch.float32,
        n=n,
        heads=2,
        block_size=block_size,
        batch=1,
    )
    stats = local_window(5).stats(n, num_heads=2, block_size=block_size)
    assert stats.block_size == covering and stats.blocks_total == 2


def test_small_block_size_is_kept():
    assert block_masks.get(local_window(5), 64, 2, block_size=16).BLOCK_SIZE == (16, 16)
