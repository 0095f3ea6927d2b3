"""Each pattern's predicate against its rule restated in plain Python, and pattern identity."""

from __future__ import annotations

import pytest
import sparse_rules as rules
import torch
from dilated_attn_sparse import (
    dilated_blocks,
    from_mask_mod,
    global_local,
    intersection,
    local_window,
    random_blocks,
    strided,
    union,
)
from dilated_attn_sparse.reference import dense_mask


@pytest.mark.parametrize("n", [1, 37, 64])
@pytest.mark.parametrize(
    "pattern, rule, heads",
    [
        (local_window(0), rules.local(0), 1),
        (local_window(5), rules.local(5), 1),
        (dilated_blocks(3, 2, 8), rules.dilated(3, 2, 8), 4),
        (dilated_blocks(2, 1, 4), rules.dilated(2, 1, 4), 1),
        (global_local(3, 2), rules.global_local(3, 2), 1),
        (strided(4), rules.strided(4), 1),
        (local_window(2) | strided(7), rules.any_of(rules.local(2), rules.strided(7)), 1),
        (
            global_local(1, 9) & dilated_blocks(4, 3, 4),
            rules.all_of(rules.global_local(1, 9), rules.dilated(4, 3, 4)),
            3,
        ),
    ],
    ids=["window0", "window5", "dilated", "dilated_r1", "global_local", "strided", "union", "intersection"],
)
def test_predicate_matches_rule(pattern, rule, heads, n):
    for causal in (False, True):
        assert torch.equal(
            dense_mask(pattern, n, heads, causal=causal), rules.dense(rule, n, heads, causal=causal)
        )


def test_random_blocks_draws_exactly_its_density():
    pattern = random_blocks(0.25, seed=7, block_size=8)
    table = pattern.table(100)  # 13 blocks per side
    assert table.shape == (13, 13)
    assert int(table.sum()) == round(0.25 * 13 * 13)
    assert torch.equal(pattern.table(100), table), "the same seed must draw the same blocks"
    assert not torch.equal(random_blocks(0.25, seed=8, block_size=8).table(100), table)
    assert torch.equal(dense_mask(pattern, 100, 1)[0], rules.dense(rules.table(table, 8), 100, 1)[0])


def test_random_blocks_draws_at_least_one_block():
    assert int(random_blocks(1e-6, block_size=4).table(10).sum()) == 1


def test_from_mask_mod_passes_the_user_predicate_through():
    def band(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx >= 0) & (q_idx - kv_idx <= h)

    allowed = dense_mask(from_mask_mod(band), 20, 3)
    assert torch.equal(allowed, rules.dense(lambda h, i, j: 0 <= i - j <= h, 20, 3))


def test_head_dependence():
    assert not local_window(3).per_head
    assert not dilated_blocks(4, 1).per_head
    assert dilated_blocks(4, 2).per_head
    assert from_mask_mod(lambda b, h, q, kv: q >= kv).per_head
    assert not from_mask_mod(lambda b, h, q, kv: q >= kv, per_head=False).per_head
    assert (local_window(3) | dilated_blocks(4, 2)).per_head
    assert not (local_window(3) & strided(2)).per_head


def test_patterns_are_values():
    assert local_window(3) == local_window(3) and hash(local_window(3)) == hash(local_window(3))
    assert local_window(3) != local_window(4)
    assert random_blocks(0.1, 2) == random_blocks(0.1, 2)
    assert union(local_window(1), strided(3)) == (local_window(1) | strided(3))
    assert intersection(local_window(1), strided(3)) == (local_window(1) & strided(3))
    assert len({dilated_blocks(4, 2), dilated_blocks(4, 2), dilated_blocks(4, 4)}) == 2
