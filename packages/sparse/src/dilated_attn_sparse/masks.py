"""Building FlexAttention ``BlockMask``s from sparse patterns."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask

from dilated_attn_sparse.compiled import compiled

if TYPE_CHECKING:
    from dilated_attn_sparse.patterns import MaskMod, SparsePattern

# Up to this many mask entries (heads x n x n), building eagerly (which materialises the dense
# mask) is cheaper than compiling the builder; beyond it, only the compiled builder fits in memory.
EAGER_MASK_ENTRIES = 1 << 26


def causal_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    return q_idx >= kv_idx


def _create(
    mask_mod: MaskMod,
    batch: int | None,
    heads: int | None,
    seq_len: int,
    block_size: int,
    device: torch.device,
) -> BlockMask:
    return create_block_mask(mask_mod, batch, heads, seq_len, seq_len, device=device, BLOCK_SIZE=block_size)


def build_block_mask(
    pattern: SparsePattern,
    seq_len: int,
    num_heads: int,
    *,
    batch: int = 1,
    block_size: int,
    causal: bool,
    device: torch.device,
) -> BlockMask:
    """The ``BlockMask`` of ``pattern`` (and the causal mask) for ``seq_len`` tokens.

    Its shape is ``(batch or 1, num_heads or 1, n, n)``: batch and heads are broadcast unless
    ``pattern.mask_extents`` says the predicate differs along them.
    """
    per_sequence, per_head = pattern.mask_extents(device)
    mask_mod = pattern.mask_mod(seq_len, device)
    if causal:
        mask_mod = and_masks(mask_mod, causal_mask)
    batches = batch if per_sequence else None
    heads = num_heads if per_head else None
    build = _create
    if device.type == "cuda" and (batches or 1) * (heads or 1) * seq_len * seq_len > EAGER_MASK_ENTRIES:
        # Graph breaks allowed, as in FlexAttention's documented torch.compile(create_block_mask):
        # one in assembling the BlockMask object, after the fused mask reduction, costs nothing here.
        key = ("block_mask", seq_len, batches, heads, block_size, device)
        build = compiled(_create, key, fullgraph=False)
    return build(mask_mod, batches, heads, seq_len, block_size, device)
