"""``BlockMask``s cached in the library's metadata cache, so that a forward pass never rebuilds its mask."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from dilated_attn.cache import CacheRegion, MetadataCache, metadata_cache

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


def block_mask_nbytes(mask: BlockMask) -> int:
    """Bytes of the index tensors a ``BlockMask`` holds (what its cache entry costs)."""
    return sum(t.nbytes for t in mask.as_tuple() if isinstance(t, torch.Tensor))


class BlockMaskCache:
    """``BlockMask``s keyed by (pattern, n, batch, heads, block size, causal, device), least recently used
    evicted first. ``builds`` counts the masks built since creation (or :meth:`clear`).

    By default a cache holds its masks in a private region with ``budget_bytes`` (the metadata
    cache's default budget when ``None``); the process-wide :data:`block_masks` is the region
    ``"sparse.block_masks"`` of the library's one metadata cache (``python -m dilated_attn cache``).
    """

    def __init__(self, budget_bytes: int | None = None, *, region: CacheRegion | None = None) -> None:
        self.builds = 0
        self._region = (
            region if region is not None else MetadataCache(budget_bytes).region("sparse.block_masks")
        )

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

        def build() -> BlockMask:
            # FlexAttention (and the compiler stack it brings) loads with the first mask built.
            from dilated_attn_sparse.masks import build_block_mask

            self.builds += 1
            return build_block_mask(
                pattern, seq_len, num_heads, batch=batch, block_size=block_size, causal=causal, device=device
            )

        return self._region.get_or_build(key, build, nbytes=block_mask_nbytes)

    def __len__(self) -> int:
        return len(self._region)

    def stats(self) -> dict[str, int]:
        return self._region.stats()

    def clear(self) -> None:
        self._region.clear()
        self.builds = 0


block_masks = BlockMaskCache(region=metadata_cache("sparse.block_masks"))
"""The process-wide cache used by :func:`dilated_attn_sparse.block_sparse_attention`."""
