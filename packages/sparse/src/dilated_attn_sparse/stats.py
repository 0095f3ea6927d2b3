"""How sparse a pattern is at a given length: blocks computed, and allowed (query, key) pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dilated_attn_sparse.cache import block_masks, canonical_device
from dilated_attn_sparse.validation import check_block_size, check_seq_len, clamp_block_size

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from dilated_attn_sparse.patterns import SparsePattern

# Mask entries evaluated at once when counting the allowed pairs of partial blocks.
_TILE_ENTRIES = 1 << 24


@dataclass(frozen=True)
class SparsityStats:
    """Counts summed over heads, for one sequence of ``seq_len`` tokens."""

    seq_len: int
    num_heads: int
    block_size: int
    causal: bool
    blocks_computed: int
    blocks_total: int
    allowed_pairs: int

    @property
    def density(self) -> float:
        """Fraction of the ``(query block, key block)`` pairs computed (the work FlexAttention does)."""
        return self.blocks_computed / self.blocks_total

    @property
    def pair_density(self) -> float:
        """Fraction of the ``(query, key)`` pairs allowed (the work the pattern asks for)."""
        return self.allowed_pairs / (self.num_heads * self.seq_len * self.seq_len)

    def flops(self, head_dim: int, *, batch: int = 1, backward: bool = False) -> float:
        """Useful FLOPs: ``4 * batch * head_dim`` per allowed pair; forward+backward is 3.5x."""
        total = 4.0 * batch * head_dim * self.allowed_pairs
        return total * 3.5 if backward else total


def _dense_blocks(
    num: torch.Tensor | None, indices: torch.Tensor | None, num_kv_blocks: int
) -> torch.Tensor | None:
    """``(B, H, q blocks, kv blocks)`` bool from FlexAttention's (count, indices) layout."""
    if num is None or indices is None:
        return None
    valid = torch.arange(indices.shape[-1], device=indices.device) < num.unsqueeze(-1)
    # Unused index slots scatter into a spare column that is dropped.
    columns = torch.where(valid, indices.long(), num_kv_blocks)
    dense = torch.zeros(*num.shape, num_kv_blocks + 1, dtype=torch.bool, device=num.device)
    dense.scatter_(-1, columns, True)
    return dense[..., :num_kv_blocks]


def _partial_pairs(block_mask: BlockMask, partial: torch.Tensor, seq_len: int, block_size: int) -> int:
    """Allowed pairs inside partial blocks: the predicate evaluated on each block's indices."""
    tiles = partial.nonzero()
    if tiles.numel() == 0:
        return 0
    device = partial.device
    offsets = torch.arange(block_size, device=device, dtype=torch.int32)
    step = max(1, _TILE_ENTRIES // (block_size * block_size))
    total = 0
    for start in range(0, tiles.shape[0], step):
        chunk = tiles[start : start + step].to(torch.int32)
        b = chunk[:, 0, None, None]
        h = chunk[:, 1, None, None]
        q_idx = chunk[:, 2, None, None] * block_size + offsets[None, :, None]
        kv_idx = chunk[:, 3, None, None] * block_size + offsets[None, None, :]
        inside = (q_idx < seq_len) & (kv_idx < seq_len)
        allowed = block_mask.mask_mod(
            torch.zeros_like(b), h, q_idx.clamp(max=seq_len - 1), kv_idx.clamp(max=seq_len - 1)
        )
        total += int((allowed & inside).sum().item())
    return total


def sparsity_stats(
    pattern: SparsePattern,
    seq_len: int,
    *,
    num_heads: int = 1,
    block_size: int = 128,
    causal: bool = False,
    device: torch.device | str = "cpu",
) -> SparsityStats:
    """Count the blocks FlexAttention computes and the pairs the pattern allows.

    Uses (and fills) the block-mask cache. Full blocks count their exact size; partial blocks are
    counted by evaluating the predicate, which must therefore broadcast over index tensors (every
    predicate built from elementwise torch ops does). ``block_size`` is capped as in
    :func:`.block_sparse_attention`, and the stats report the block used.
    """
    seq_len = check_seq_len(seq_len)
    block_size = clamp_block_size(check_block_size(block_size), seq_len)
    device = canonical_device(device)
    if pattern.mask_extents(device)[0]:
        raise ValueError(
            f"pattern={pattern!r} reads the batch index b, so its sparsity differs per sequence; "
            "sparsity_stats describes one sequence of a pattern that ignores b"
        )
    block_mask = block_masks.get(
        pattern, seq_len, num_heads, block_size=block_size, causal=causal, device=device
    )
    nb = -(-seq_len // block_size)
    partial = _dense_blocks(block_mask.kv_num_blocks, block_mask.kv_indices, nb)
    full = _dense_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nb)
    assert partial is not None
    # A head-independent mask has one head; every head computes it.
    repeat = num_heads // partial.shape[1]
    sizes = (seq_len - torch.arange(nb, device=partial.device) * block_size).clamp(max=block_size)
    blocks = int(partial.sum().item())
    pairs = _partial_pairs(block_mask, partial, seq_len, block_size)
    if full is not None:
        blocks += int(full.sum().item())
        pairs += int((full.sum(dim=(0, 1)).long() * sizes[:, None] * sizes[None, :]).sum().item())
    return SparsityStats(
        seq_len=seq_len,
        num_heads=num_heads,
        block_size=block_size,
        causal=bool(causal),
        blocks_computed=blocks * repeat,
        blocks_total=num_heads * nb * nb,
        allowed_pairs=pairs * repeat,
    )
