"""Density (blocks computed) and useful FLOPs (allowed pairs) against counts from the plain rules."""

from __future__ import annotations

import pytest
import sparse_rules as rules
import torch
from dilated_attn_sparse import dilated_blocks, global_local, local_window, random_blocks


def _block_count(allowed: torch.Tensor, block: int) -> int:
    """Blocks holding at least one allowed pair, counted from the dense ``(h, n, n)`` mask."""
    h, n, _ = allowed.shape
    nb = -(-n // block)
    padded = torch.zeros(h, nb * block, nb * block, dtype=torch.bool)
    padded[:, :n, :n] = allowed
    return int(padded.view(h, nb, block, nb, block).any(dim=(2, 4)).sum())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "pattern, rule",
    [
        (local_window(10), rules.local(10)),
        (dilated_blocks(3, 3, 8), rules.dilated(3, 3, 8)),
        (
            global_local(2, 4) | dilated_blocks(2, 2, 8),
            rules.any_of(rules.global_local(2, 4), rules.dilated(2, 2, 8)),
        ),
    ],
    ids=["local_window", "dilated_blocks", "union"],
)
def test_counts_match_rule(pattern, rule, causal):
    n, heads, block = 61, 3, 8
    allowed = rules.dense(rule, n, heads, causal=causal)
    stats = pattern.stats(n, num_heads=heads, block_size=block, causal=causal)
    assert stats.allowed_pairs == int(allowed.sum())
    assert stats.blocks_computed == _block_count(allowed, block)
    assert stats.blocks_total == heads * 8 * 8
    assert pattern.density(n, num_heads=heads, block_size=block, causal=causal) == stats.density
    assert stats.pair_density == int(allowed.sum()) / (heads * n * n)
    assert pattern.flops(n, heads, 64, batch=2, block_size=block, causal=causal) == 4 * 2 * 64 * int(
        allowed.sum()
    )
    assert pattern.flops(n, heads, 64, block_size=block, causal=causal, backward=True) == 3.5 * 4 * 64 * int(
        allowed.sum()
    )


def test_random_blocks_density_is_exact_on_its_own_blocks():
    pattern = random_blocks(0.2, seed=3, block_size=16)
    stats = pattern.stats(160, num_heads=4, block_size=16)
    assert stats.density == pattern.density(160, num_heads=4, block_size=16) == round(0.2 * 100) / 100
    assert stats.allowed_pairs == 4 * 20 * 16 * 16


def test_dense_window_computes_every_block():
    assert local_window(100).density(64, block_size=16) == 1.0
    assert local_window(100).stats(64, block_size=16).pair_density == 1.0
