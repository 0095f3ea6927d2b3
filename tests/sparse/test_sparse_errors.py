"""Bad patterns and bad inputs raise ValueError/TypeError naming the argument, the value and the rule."""

from __future__ import annotations

import pytest
import torch
from dilated_attn_sparse import (
    block_sparse_attention,
    dilated_blocks,
    from_mask_mod,
    global_local,
    local_window,
    random_blocks,
    strided,
    union,
)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: local_window(-1), ValueError, r"window=-1 must be an int >= 0"),
        (lambda: local_window(2.5), TypeError, r"window=2.5 must be an int"),
        (lambda: local_window(True), TypeError, r"window=True must be an int"),
        (lambda: global_local(-2, 3), ValueError, r"global_tokens=-2 must be an int >= 0"),
        (lambda: global_local(2, -3), ValueError, r"window=-3 must be an int >= 0"),
        (lambda: strided(0), ValueError, r"stride=0 must be an int >= 1"),
        (lambda: random_blocks(0.0), ValueError, r"density=0.0 must be in \(0, 1\]"),
        (lambda: random_blocks(1.5), ValueError, r"density=1.5 must be in \(0, 1\]"),
        (lambda: random_blocks(-0.1), ValueError, r"density=-0.1 must be in \(0, 1\]"),
        (lambda: random_blocks("0.5"), TypeError, r"density='0.5' must be a float"),
        (lambda: random_blocks(0.5, seed=-1), ValueError, r"seed=-1 must be an int >= 0"),
        (
            lambda: random_blocks(0.5, block_size=96),
            ValueError,
            r"block_size=96 must be a positive power of 2",
        ),
        (lambda: dilated_blocks(0, 1), ValueError, r"segment_blocks=0 must be an int >= 1"),
        (lambda: dilated_blocks(4, 0), ValueError, r"dilation=0 must be an int >= 1"),
        (lambda: dilated_blocks(4, 8), ValueError, r"dilation=8 must be <= segment_blocks=4"),
        (
            lambda: dilated_blocks(4, 2, block_size=0),
            ValueError,
            r"block_size=0 must be a positive power of 2",
        ),
        (
            lambda: dilated_blocks(4, 2, block_size=-64),
            ValueError,
            r"block_size=-64 must be a positive power of 2",
        ),
        (lambda: dilated_blocks(4, 2, block_size=64.0), TypeError, r"block_size=64.0 must be an int"),
        (lambda: from_mask_mod("q >= kv"), TypeError, r"fn='q >= kv' must be callable"),
        (lambda: union(local_window(1)), ValueError, r"union of 1 pattern\(s\): it needs at least 2"),
        (lambda: union(local_window(1), "all"), TypeError, r"union part 1='all' must be a SparsePattern"),
        (lambda: local_window(1) & 3, TypeError, r"intersection part 1=3 must be a SparsePattern"),
    ],
)
def test_bad_pattern(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_bad_call():
    q = torch.randn(1, 32, 2, 8)
    with pytest.raises(TypeError, match=r"pattern=None must be a SparsePattern"):
        block_sparse_attention(q, q, q, None)
    with pytest.raises(ValueError, match=r"block_size=48 must be a positive power of 2"):
        block_sparse_attention(q, q, q, local_window(2), block_size=48)
    with pytest.raises(ValueError, match=r"block_size=0 must be a positive power of 2"):
        block_sparse_attention(q, q, q, local_window(2), block_size=0)
    with pytest.raises(ValueError, match="rank 4"):
        block_sparse_attention(q[0], q[0], q[0], local_window(2))
    with pytest.raises(ValueError, match=r"k.shape=\(1, 16, 2, 8\) must equal q.shape"):
        block_sparse_attention(q, q[:, :16], q, local_window(2))
    with pytest.raises(TypeError, match=r"v.dtype=torch.float64 must equal q.dtype"):
        block_sparse_attention(q, q, q.double(), local_window(2))
    with pytest.raises(ValueError, match=r"scale=-1.0 must be a finite positive number"):
        block_sparse_attention(q, q, q, local_window(2), scale=-1.0)
    with pytest.raises(ValueError, match="head_dim=0"):
        z = q[..., :0]
        block_sparse_attention(z, z, z, local_window(2))


def test_bad_stats_arguments():
    with pytest.raises(ValueError, match=r"seq_len=0 must be >= 1"):
        local_window(2).density(0)
    with pytest.raises(ValueError, match=r"num_heads=0 must be >= 1"):
        local_window(2).density(8, num_heads=0)
    with pytest.raises(ValueError, match=r"block_size=3 must be a positive power of 2"):
        local_window(2).density(8, block_size=3)
