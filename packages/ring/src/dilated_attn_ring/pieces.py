"""Pieces as tensors: gathering a piece's head blocks, moving them, and writing results back.

Every head block is a contiguous ``(b, H', count, ...)`` tensor, the layout the block-attention
primitives take. Gathering one is an ``index_select`` on the chunk seen as ``(b, m*h, ...)``. Keys
and values travel in one flat buffer per piece, block after block, each block stored as
``(2, b, H', count, d)`` so that its keys and its values are contiguous views.
"""

from __future__ import annotations

import torch
from dilated_attn.cache import metadata_cache
from dilated_attn.ops import merge_lse

from dilated_attn_ring.plan import Piece

_INDICES = metadata_cache("ring.piece_indices")


def block_indices(piece: Piece, num_heads: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per block, ``(H' * count,)`` indices of its (row, head) pairs in the chunk as ``(m * h)`` rows.

    Built once per (piece, heads, device) and kept in the metadata cache, so a forward or backward
    makes no index tensor and no host-to-device copy.
    """
    return _INDICES.get_or_build(
        (piece, num_heads, device),
        lambda: _build_indices(piece, num_heads, device),
        nbytes=lambda out: sum(t.nbytes for t in out) + 128 * len(out),
    )


def _build_indices(piece: Piece, num_heads: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    out = []
    for blk in piece.blocks:
        firsts = torch.tensor(blk.firsts, dtype=torch.int64)
        heads = torch.tensor(blk.heads, dtype=torch.int64)
        rows = firsts[:, None] + piece.dilation * torch.arange(blk.count, dtype=torch.int64)[None, :]
        out.append((rows * num_heads + heads[:, None]).reshape(-1).to(device))
    return tuple(out)


def _flat(x: torch.Tensor) -> torch.Tensor:
    b, m, h = x.shape[:3]
    return x.view(b, m * h, *x.shape[3:])


def gather(x: torch.Tensor, index: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows ``index`` of ``x`` ``(b, m, h, *rest)`` (contiguous) as a block ``(b, heads, count, *rest)``."""
    rows = _flat(x).index_select(1, index)
    return rows.view(x.shape[0], heads, -1, *x.shape[3:])


def scatter_add(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """Add block ``values`` ``(b, H', count, d)`` into rows ``index`` of ``target`` ``(b, m, h, d)``.

    The indices of one block are distinct. A target of lower precision than ``values`` (16-bit
    gradients, float32 piece sums) is added to in ``values``' dtype and rounded once, on the write.
    """
    flat = _flat(target)
    vals = values.reshape(flat.shape[0], -1, flat.shape[-1])
    if vals.dtype == target.dtype:
        flat.index_add_(1, index, vals)
        return
    flat.index_copy_(1, index, (flat.index_select(1, index).to(vals.dtype) + vals).to(target.dtype))


def merge_into(
    out: torch.Tensor, lse: torch.Tensor, index: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor
) -> None:
    """LSE-merge a block's ``(b, H', count, d)`` / ``(b, H', count)`` result into rows ``index`` in place.

    ``out`` ``(b, m, h, d)`` and ``lse`` ``(b, m, h)`` are contiguous; the indices of one block are
    distinct, so the write-back is unambiguous.
    """
    flat_out, flat_lse = _flat(out), _flat(lse)
    b, d = flat_out.shape[0], flat_out.shape[-1]
    # The merge runs in the LSE's dtype (float32 at least); a 16-bit ``out`` is rounded once, on the write.
    ct = lse.dtype
    merged_out, merged_lse = merge_lse(
        flat_out.index_select(1, index).to(ct),
        flat_lse.index_select(1, index),
        part_out.reshape(b, -1, d).to(ct),
        part_lse.reshape(b, -1).to(ct),
    )
    flat_out.index_copy_(1, index, merged_out.to(out.dtype))
    flat_lse.index_copy_(1, index, merged_lse)


def kv_numel(piece: Piece, batch: int, head_dim: int) -> int:
    """Elements of a piece's key/value buffer."""
    return 2 * batch * piece.size * head_dim


def kv_blocks(buf: torch.Tensor, piece: Piece, batch: int, head_dim: int) -> list[torch.Tensor]:
    """Views ``(2, b, H', count, d)`` of each block in a flat key/value buffer of ``piece``."""
    views, at = [], 0
    for blk in piece.blocks:
        size = 2 * batch * blk.size * head_dim
        views.append(buf[at : at + size].view(2, batch, len(blk.heads), blk.count, head_dim))
        at += size
    return views


def pack_kv(
    k: torch.Tensor, v: torch.Tensor, piece: Piece, indices: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """The flat key/value buffer of ``piece`` gathered from the chunk's ``k, v`` ``(b, m, h, d)``."""
    b, d = k.shape[0], k.shape[-1]
    buf = torch.empty(kv_numel(piece, b, d), dtype=k.dtype, device=k.device)
    for view, index in zip(kv_blocks(buf, piece, b, d), indices):
        for src, dst in ((k, view[0]), (v, view[1])):
            torch.index_select(_flat(src), 1, index, out=dst.view(b, -1, d))
    return buf


def select_heads(x: torch.Tensor, heads: tuple[int, ...] | None) -> torch.Tensor:
    """Heads (dim 1) at positions ``heads`` of a block, or the block itself for ``None``."""
    if heads is None:
        return x
    return x.index_select(1, _positions(heads, x.device))


def add_heads(target: torch.Tensor, heads: tuple[int, ...] | None, values: torch.Tensor) -> None:
    """``target[:, heads] += values`` for a block (all heads for ``None``)."""
    if heads is None:
        target += values.to(target.dtype)
    else:
        target.index_add_(1, _positions(heads, target.device), values.to(target.dtype))


def merge_heads(
    out: torch.Tensor,
    lse: torch.Tensor,
    heads: tuple[int, ...] | None,
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
) -> None:
    """LSE-merge ``part_out, part_lse`` into heads ``heads`` of blocks ``out, lse`` in place."""
    if heads is None:
        merged_out, merged_lse = merge_lse(out, lse, part_out.to(out.dtype), part_lse.to(lse.dtype))
        out.copy_(merged_out)
        lse.copy_(merged_lse)
        return
    at = _positions(heads, out.device)
    merged_out, merged_lse = merge_lse(
        out.index_select(1, at), lse.index_select(1, at), part_out.to(out.dtype), part_lse.to(lse.dtype)
    )
    out.index_copy_(1, at, merged_out)
    lse.index_copy_(1, at, merged_lse)


def _positions(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(heads, dtype=torch.int64, device=device)
