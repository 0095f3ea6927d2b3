"""A bounded LRU cache of ``BlockMask``s, so that a forward pass never rebuilds its mask."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch

from dilated_attn_sparse.validation import (
    check_batch,
    check_block_size,
    check_flag,
    check_num_heads,
    check_seq_len,
    clamp_block_size,
)

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from dilated_attn_sparse.patterns import SparsePattern


def canonical_device(device: torch.device | str) -> torch.device:
    """``cuda`` and ``cuda:0`` name one device (and one cache entry) when device 0 is current."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class BlockMaskCache:
    """``BlockMask``s keyed by (pattern, n, batch, heads, block size, causal, device), least recently used
    evicted first. ``builds`` counts the masks built since creation (or :meth:`clear`)."""

    def __init__(self, maxsize: int = 16) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize={maxsize!r} must be a positive int")
        self.maxsize = maxsize
        self.builds = 0
        self._masks: OrderedDict[Hashable, BlockMask] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self,
        pattern: SparsePattern,
        seq_len: int,
        num_heads: int,
        *,
        batch: int = 1,
        block_size: int = 128,
        causal: bool = False,
        device: torch.device | str = "cpu",
    ) -> BlockMask:
        """The mask of ``pattern`` for ``batch`` sequences of ``seq_len`` tokens and ``num_heads``
        heads, built on a miss. ``block_size`` is capped at one block covering the sequence
        (:func:`.validation.clamp_block_size`)."""
        seq_len = check_seq_len(seq_len)
        num_heads = check_num_heads(num_heads)
        batch = check_batch(batch)
        block_size = clamp_block_size(check_block_size(block_size), seq_len)
        causal = check_flag("causal", causal)
        device = canonical_device(device)
        # A mask that does not differ along batch or heads serves any number of them.
        per_sequence, per_head = pattern.mask_extents(device)
        key = (
            pattern,
            seq_len,
            batch if per_sequence else None,
            num_heads if per_head else None,
            block_size,
            causal,
            device,
        )
        with self._lock:
            mask = self._masks.get(key)
            if mask is not None:
                self._masks.move_to_end(key)
                return mask
            # FlexAttention (and the compiler stack it brings) loads with the first mask built.
            from dilated_attn_sparse.masks import build_block_mask

            mask = build_block_mask(
                pattern, seq_len, num_heads, batch=batch, block_size=block_size, causal=causal, device=device
            )
            self.builds += 1
            self._masks[key] = mask
            if len(self._masks) > self.maxsize:
                self._masks.popitem(last=False)
            return mask

    def __len__(self) -> int:
        return len(self._masks)

    def clear(self) -> None:
        with self._lock:
            self._masks.clear()
            self.builds = 0


block_masks = BlockMaskCache()
"""The process-wide cache used by :func:`dilated_attn_sparse.block_sparse_attention`."""
