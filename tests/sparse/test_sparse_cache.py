"""The block-mask cache: built once per (pattern, n, heads, block size, causal, device), LRU-bounded."""

from __future__ import annotations

import pytest
import torch
from dilated_attn_sparse import (
    BlockMaskCache,
    block_masks,
    block_sparse_attention,
    dilated_blocks,
    local_window,
)
from dilated_attn_sparse.cache import block_mask_nbytes


def test_second_call_builds_no_mask():
    block_masks.clear()
    q = torch.randn(1, 50, 2, 8, requires_grad=True)
    block_sparse_attention(q, q, q, local_window(6), block_size=16).sum().backward()
    assert block_masks.builds == 1
    block_sparse_attention(q, q, q, local_window(6), block_size=16).sum().backward()
    assert block_masks.builds == 1, "the second call rebuilt its mask"
    # An equal pattern built anew is the same cache entry.
    block_sparse_attention(q, q, q, local_window(6), block_size=16)
    assert block_masks.builds == 1
    block_sparse_attention(q, q, q, local_window(6), block_size=16, causal=True)
    assert block_masks.builds == 2


def test_key_separates_length_heads_block_size():
    cache = BlockMaskCache()
    pattern = dilated_blocks(2, 2, 8)  # per head
    first = cache.get(pattern, 40, 2, block_size=8)
    assert cache.get(pattern, 40, 2, block_size=8) is first
    cache.get(pattern, 41, 2, block_size=8)
    cache.get(pattern, 40, 4, block_size=8)
    cache.get(pattern, 40, 2, block_size=16)
    assert cache.builds == 4


def test_head_independent_mask_serves_any_head_count():
    cache = BlockMaskCache()
    mask = cache.get(local_window(3), 40, 2, block_size=8)
    assert mask.kv_num_blocks.shape[:2] == (1, 1)
    assert cache.get(local_window(3), 40, 8, block_size=8) is mask
    assert cache.builds == 1


def test_least_recently_used_is_evicted():
    a, b, c = local_window(1), local_window(2), local_window(3)
    size = block_mask_nbytes(BlockMaskCache().get(a, 32, 1, block_size=8))
    cache = BlockMaskCache(budget_bytes=2 * size + size // 2)
    cache.get(a, 32, 1, block_size=8)
    cache.get(b, 32, 1, block_size=8)
    cache.get(a, 32, 1, block_size=8)  # a is now the most recent
    cache.get(c, 32, 1, block_size=8)  # evicts b
    assert len(cache) == 2 and cache.builds == 3
    cache.get(a, 32, 1, block_size=8)
    assert cache.builds == 3
    cache.get(b, 32, 1, block_size=8)
    assert cache.builds == 4


def test_budget_must_be_a_non_negative_int():
    with pytest.raises((TypeError, ValueError), match="budget"):
        BlockMaskCache(budget_bytes=-1)


def test_process_wide_masks_are_a_region_of_the_metadata_cache():
    from dilated_attn.cache import cache_stats

    block_masks.get(local_window(5), 48, 2, block_size=16)
    assert cache_stats()["regions"]["sparse.block_masks"]["entries"] >= 1
