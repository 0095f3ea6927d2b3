"""The dense float64 oracle for block-sparse attention: softmax restricted to an allowed-key mask.

O(h n^2) time and memory: for tests and small checks only.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from dilated_attn.validation import check_qkv, check_scale
from torch.nn.attention.flex_attention import create_mask

from dilated_attn_sparse.masks import causal_mask
from dilated_attn_sparse.patterns import SparsePattern
from dilated_attn_sparse.validation import check_batch, check_num_heads, check_seq_len


def dense_mask(
    pattern: SparsePattern, seq_len: int, num_heads: int, *, causal: bool = False, batch: int | None = None
) -> torch.Tensor:
    """``(h, n, n)`` bool on the CPU: ``[j, p, key]`` is whether head ``j``'s query ``p`` sees ``key``.

    With ``batch``, ``(batch, h, n, n)`` with the batch index ``b`` first; a pattern that reads ``b``
    needs it.
    """
    seq_len = check_seq_len(seq_len)
    num_heads = check_num_heads(num_heads)
    device = torch.device("cpu")
    if batch is None:
        if pattern.mask_extents(device)[0]:
            raise ValueError(f"pattern={pattern!r} reads the batch index b: pass batch=")
        return dense_mask(pattern, seq_len, num_heads, causal=causal, batch=1)[0]
    batch = check_batch(batch)
    allowed = create_mask(pattern.mask_mod(seq_len, device), batch, num_heads, seq_len, seq_len, device)
    if causal:
        allowed = allowed & create_mask(causal_mask, 1, 1, seq_len, seq_len, device)
    return allowed


@overload
def masked_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: Literal[False] = False,
) -> torch.Tensor: ...


@overload
def masked_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def masked_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def masked_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 attention on ``(b, n, h, d)`` inputs over the keys ``allowed``: ``(h, n, n)``
    for every sequence, or ``(b, h, n, n)`` per sequence.

    Returns float64 ``out`` ``(b, n, h, d)`` and, with ``return_lse``, float64 ``lse`` ``(b, n, h)``.
    Rows with no allowed key give 0 and ``lse = -inf``, with zero gradients. Differentiable.
    """
    b, n, h, _, d = check_qkv(q, k, v, enable_gqa=False)
    scale = check_scale(scale, d)
    if allowed.dtype != torch.bool or tuple(allowed.shape) not in ((h, n, n), (b, h, n, n)):
        raise ValueError(
            f"allowed has dtype {allowed.dtype} and shape {tuple(allowed.shape)}; it must be bool "
            f"(h, n, n)=({h}, {n}, {n}) or (b, h, n, n)=({b}, {h}, {n}, {n})"
        )
    allowed = allowed.to(q.device)
    q64, k64, v64 = (t.to(torch.float64).transpose(1, 2) for t in (q, k, v))  # (b, h, n, d)
    scores = scale * (q64 @ k64.transpose(-1, -2))
    empty = ~allowed.any(dim=-1, keepdim=True)  # ([b,] h, n, 1)
    # Forbidden keys take a finite stand-in so that neither values nor gradients become NaN.
    safe = scores.masked_fill(~allowed, 0.0)
    row_max = scores.masked_fill(~allowed, float("-inf")).amax(dim=-1, keepdim=True)
    row_max = row_max.masked_fill(empty, 0.0).detach()
    weights = torch.exp(safe - row_max).masked_fill(~allowed, 0.0)
    total = weights.sum(dim=-1, keepdim=True).masked_fill(empty, 1.0)
    probs = weights / total
    out = (probs @ v64).transpose(1, 2)
    if not return_lse:
        return out
    lse = (torch.log(total) + row_max).masked_fill(empty, float("-inf"))
    return out, lse.squeeze(-1).transpose(1, 2)
