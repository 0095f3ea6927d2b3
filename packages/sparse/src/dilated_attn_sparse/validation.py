"""Checks of the sparse package's own arguments; tensors are checked by ``dilated_attn.validation``."""

from __future__ import annotations

import numbers


def check_block_size(block_size: object) -> int:
    """``block_size`` must be a positive power of 2 (FlexAttention tiles blocks by powers of 2)."""
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise TypeError(f"block_size={block_size!r} must be an int (got {type(block_size).__name__})")
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size} must be a positive power of 2")
    return int(block_size)


def check_seq_len(seq_len: object) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral):
        raise TypeError(f"seq_len={seq_len!r} must be an int (got {type(seq_len).__name__})")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    return int(seq_len)


def check_num_heads(num_heads: object) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral):
        raise TypeError(f"num_heads={num_heads!r} must be an int (got {type(num_heads).__name__})")
    if num_heads < 1:
        raise ValueError(f"num_heads={num_heads} must be >= 1")
    return int(num_heads)
