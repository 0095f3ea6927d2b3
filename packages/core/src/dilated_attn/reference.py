"""The float64 dense oracle (SPEC 1a/1b): every implementation is checked against it.

Exact LongNet is dense attention with the additive bias ``log c``, where ``c(p, key)`` counts the
patterns whose key set for query ``p`` holds ``key``. Cost is O(h n^2): for tests and small checks only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal, overload

import torch

from dilated_attn.pattern import DilationPattern, check_mode
from dilated_attn.validation import check_bool, check_key_padding_mask, check_qkv, check_scale


def _check_fits(batch: int, n: int, num_heads: int, device: torch.device) -> None:
    """Refuse, before allocating, a dense problem that cannot fit: the oracle holds several
    ``(b, h, n, n)`` float64 tensors, and an oversized host allocation gets the process killed."""
    need = 4 * batch * num_heads * n * n * 8
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free:
        raise torch.OutOfMemoryError(
            f"the float64 oracle needs about {need / 2**30:.1f} GiB for batch={batch}, seq={n}, "
            f"heads={num_heads} (O(b h n^2)); {free / 2**30:.1f} GiB are free on {device}"
        )


def multiplicity(
    n: int,
    num_heads: int,
    pattern: DilationPattern,
    mode: str = "longnet",
    causal: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``c`` of SPEC 1a: ``(h, n, n)`` float64, the number of patterns that let query p see key k."""
    check_mode(mode)
    pos = torch.arange(n, device=device)
    c = torch.zeros(num_heads, n, n, dtype=torch.float64, device=device)
    for (W, r), heads in zip(pattern.effective(n), pattern.head_sets(num_heads, mode)):
        seg = pos // W
        t = pos % W
        same_segment = seg[:, None] == seg[None, :]
        for j in heads:
            sel = t % r == j % r
            allowed = same_segment & sel[:, None] & sel[None, :]
            if causal:
                allowed &= pos[None, :] <= pos[:, None]
            c[j] += allowed.to(torch.float64)
    return c


@overload
def dilated_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | DilationPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    mode: str = "longnet",
    causal: bool = False,
    scale: float | None = None,
    return_lse: Literal[False] = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor: ...


@overload
def dilated_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | DilationPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    mode: str = "longnet",
    causal: bool = False,
    scale: float | None = None,
    return_lse: Literal[True],
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def dilated_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | DilationPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    mode: str = "longnet",
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def dilated_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int] | DilationPattern,
    dilation_rates: Sequence[int] | None = None,
    *,
    mode: str = "longnet",
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 dilated attention on ``(b, n, h, d)`` inputs.

    Returns float64 ``out`` ``(b, n, h, d)`` and, with ``return_lse``, float64 ``lse`` ``(b, n, h)``.
    Rows with no key give 0 and ``lse = -inf`` with zero gradients. Differentiable. ``k, v`` may
    have fewer heads than ``q`` (grouped-query attention): they are repeated along heads.
    """
    b, n, h, h_kv, d = check_qkv(q, k, v)
    key_padding_mask = check_key_padding_mask(key_padding_mask, b, n, q.device)
    pattern = DilationPattern.of(segment_lengths, dilation_rates)
    check_mode(mode)
    causal = check_bool("causal", causal)
    scale = check_scale(scale, d)
    if h_kv != h:
        k, v = (t.repeat_interleave(h // h_kv, dim=2) for t in (k, v))
    _check_fits(b, n, h, q.device)
    c = multiplicity(n, h, pattern, mode, causal, q.device)  # (h, n, n)
    bias = torch.log(c).unsqueeze(0)  # (1, h, n, n); -inf where c == 0
    if key_padding_mask is not None:
        bias = bias.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    q64, k64, v64 = (t.to(torch.float64).transpose(1, 2) for t in (q, k, v))  # (b, h, n, d)
    forbidden = torch.isneginf(bias)
    # Forbidden pairs are -inf whatever q and k hold, so a NaN reaches only the rows that attend to it.
    scores = torch.where(forbidden, float("-inf"), scale * (q64 @ k64.transpose(-1, -2)) + bias)
    empty = forbidden.all(dim=-1, keepdim=True).expand_as(scores)
    # Empty rows take a finite stand-in so that neither the value nor the gradient becomes NaN.
    safe = torch.where(empty, torch.zeros_like(scores), scores)
    lse = torch.logsumexp(safe, dim=-1, keepdim=True)
    probs = torch.where(empty, torch.zeros_like(scores), torch.exp(safe - lse))
    bad_v = ~torch.isfinite(v64)
    if bad_v.any():
        # 0 * NaN is NaN: the rows that do not attend to a non-finite value take the product with
        # zeros in its place (the rows that do keep the real one, and its gradient).
        reached = ((~forbidden).to(torch.float64) @ bad_v.to(torch.float64)) > 0
        out = torch.where(reached, probs @ v64, probs @ v64.masked_fill(bad_v, 0.0)).transpose(1, 2)
    else:
        out = (probs @ v64).transpose(1, 2)
    if not return_lse:
        return out
    lse = torch.where(empty[..., :1], torch.full_like(lse, float("-inf")), lse)
    return out, lse.squeeze(-1).transpose(1, 2)
