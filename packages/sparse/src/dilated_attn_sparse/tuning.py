"""FlexAttention kernel options used when the caller passes none, from measurements on Hopper.

FlexAttention picks one tile per (GPU, dtype, head size). On an H200 (torch 2.11, bf16, h=16, d=64,
n=256K, 128-token blocks; ``dilated-attn-bench flex-tuning``) two changes paid off:

- backward tiles ``M1=32, N1=128, M2=128, N2=32`` (3 stages, 4 warps) instead of the default
  ``64, 128, 128, 64`` (8 warps): forward+backward 149 -> 136 ms on ``local_window`` at 5 %
  (1.34x -> 1.23x dense cuDNN scaled by density), 172 -> 160 ms on ``random_blocks`` at 5 %;
- forward tiles ``128 x 64`` (3 stages, 4 warps) instead of ``128 x 128`` when neighbouring query
  blocks share few key blocks: 51 -> 40 ms on ``random_blocks`` at 5 %. There each key block is read
  from memory rather than from L2, and the smaller tile keeps more loads in flight per SM. Where
  neighbours share their key blocks (windows, dilated segments) the default tile is as fast or
  faster (36 vs 37 ms on ``local_window`` at 5 %), so it is kept.

Whether neighbours share key blocks is measured on the block mask itself (:func:`neighbour_share`),
once per mask, so user predicates are classified like the built-in patterns. Any ``kernel_options``
given by the caller replace these defaults entirely (FlexAttention's prefixed keys would otherwise
override the caller's unprefixed ones).
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

# Below this share of a query block's key blocks that the next query block also computes, the
# pattern counts as scattered (random_blocks at density p shares about p).
SCATTERED_BELOW = 0.5
# Query-block rows densified at a time by neighbour_share.
_ROWS = 1024

# Measured on sm_90 with 16-bit inputs, head size <= 64 and 128-token blocks (see above); the
# tiles divide 128, so they need blocks that are multiples of 128.
_SM90_BACKWARD: dict[str, Any] = {
    "bwd_BLOCK_M1": 32,
    "bwd_BLOCK_N1": 128,
    "bwd_BLOCK_M2": 128,
    "bwd_BLOCK_N2": 32,
    "bwd_num_stages": 3,
    "bwd_num_warps": 4,
}
_SM90_SCATTERED_FORWARD: dict[str, Any] = {
    "fwd_BLOCK_M": 128,
    "fwd_BLOCK_N": 64,
    "fwd_num_stages": 3,
    "fwd_num_warps": 4,
}

_shares: weakref.WeakKeyDictionary[BlockMask, float] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def neighbour_share(block_mask: BlockMask) -> float:
    """Fraction of the (query block, key block) pairs computed whose next query block computes the
    same key block: about 1 for sliding windows and dilated segments, about the density for random
    blocks. "Next" skips query blocks that compute nothing (a dilated head's skipped blocks), as the
    kernel's programs for them exit at once. Computed once per mask (cached while the mask lives)."""
    with _lock:
        found = _shares.get(block_mask)
    if found is not None:
        return found
    # The mask stores (query blocks x key blocks) indices already; densify a slab of rows at a time
    # so that this check never holds more than ``_ROWS`` rows of one head beyond them.
    batch, heads, num_rows = block_mask.kv_num_blocks.shape
    shared = computed = 0
    for b in range(batch):
        for h in range(heads):
            previous = None
            for start in range(0, num_rows, _ROWS):
                rows = _computed_rows(block_mask, b, h, slice(start, start + _ROWS))
                active = rows[rows.any(dim=1)]
                if previous is not None and len(active):
                    active = torch.cat([previous, active])
                if len(active):
                    here, after = active[:-1], active[1:]
                    shared += int((here & after).sum())
                    computed += int(here.sum())
                    previous = active[-1:]
    share = shared / computed if computed else 1.0
    with _lock:
        _shares[block_mask] = share
    return share


def _computed_rows(block_mask: BlockMask, b: int, h: int, rows: slice) -> torch.Tensor:
    """``(len(rows), key blocks)`` bool: the key blocks each query block in ``rows`` computes."""
    num_cols = block_mask.kv_indices.shape[-1]
    dense: torch.Tensor | None = None
    for counts, indices in (
        (block_mask.kv_num_blocks, block_mask.kv_indices),
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
    ):
        if counts is None or indices is None:
            continue
        idx = indices[b, h, rows].long()
        valid = torch.arange(idx.shape[-1], device=idx.device) < counts[b, h, rows, None]
        # Invalid slots go to an extra column that is dropped.
        slab = torch.zeros(idx.shape[0], num_cols + 1, dtype=torch.bool, device=idx.device)
        slab.scatter_(1, torch.where(valid, idx, num_cols), True)
        dense = slab[:, :num_cols] if dense is None else dense | slab[:, :num_cols]
    assert dense is not None
    return dense


def default_kernel_options(block_mask: BlockMask, q: torch.Tensor, block_size: int) -> dict[str, Any] | None:
    """The options to use on ``q``'s device when the caller gives none (``None``: FlexAttention's)."""
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) != (9, 0):
        return None
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] > 64 or block_size % 128:
        return None
    options = dict(_SM90_BACKWARD)
    if neighbour_share(block_mask) < SCATTERED_BELOW:
        options.update(_SM90_SCATTERED_FORWARD)
    return options
