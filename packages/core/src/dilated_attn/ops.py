"""Exact dilated attention as gather -> block attention -> LSE merge, for any set of patterns.

``dilated_forward`` runs each pattern's heads on dense blocks of their selected rows and merges the
per-pattern results by their log-sum-exps (LongNet eq. 10), which equals one softmax over the multiset
union of the key sets. ``dilated_backward`` runs each block's backward with the *merged* output and
log-sum-exp, so the gradients through the mixing weights are exact. Composers (ring attention) merge
further partial results with ``merge_lse`` and pass their merged tensors to ``dilated_backward``.

``local_forward`` and ``local_backward`` are the same contract on the fused Triton kernels
(``dilated_attn.kernels.jobs``: strided loads, no gathered copies) wherever they run, and on the
gather path elsewhere: the composers' entry points.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from functools import cache

import torch

# The kernels' dtypes and head sizes, read from the backend so that choosing a path imports no Triton.
from dilated_attn.backends.triton import DTYPES as _FUSED_DTYPES
from dilated_attn.backends.triton import HEAD_DIMS as _FUSED_HEAD_DIMS
from dilated_attn.block_attention import (
    all_finite,
    attention_backward,
    attention_forward,
    compute_dtype,
)
from dilated_attn.pattern import PatternJob, jobs_for
from dilated_attn.plan import Group, gather, groups_for, segment_view

__all__ = [
    "PatternJob",
    "jobs_for",
    "dilated_forward",
    "dilated_backward",
    "fused_applies",
    "local_forward",
    "local_backward",
    "merge_lse",
    "attention_forward",
    "attention_backward",
]


def merge_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint key multisets: ``(..., d)`` outputs, ``(...)`` LSEs."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isneginf(lse), 0.0, lse)
    out = out_a * torch.exp(lse_a - safe).unsqueeze(-1) + out_b * torch.exp(lse_b - safe).unsqueeze(-1)
    return out, lse


def _padding_bias(
    key_padding_mask: torch.Tensor | None, group: Group, dtype: torch.dtype
) -> torch.Tensor | None:
    """``(b*S, H', 1, m)`` additive bias, ``-inf`` on padded keys of the group's rows."""
    if key_padding_mask is None:
        return None
    b = key_padding_mask.shape[0]
    seg = key_padding_mask[:, group.start : group.start + group.count * group.length]
    padded = seg.view(b, group.count, group.length)[:, :, group.rows]  # (b, S, H', m)
    bias = torch.zeros(padded.shape, dtype=dtype, device=padded.device)
    bias.masked_fill_(padded, float("-inf"))
    return bias.reshape(-1, len(group.heads), 1, group.rows_per_segment)


def _generator(seed: int | None, device: torch.device, index: int) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed + 7919 * index)
    return g


def _groups(jobs: Sequence[PatternJob], n: int, h: int, device: torch.device) -> list[tuple[int, Group]]:
    return [(i, g) for i, job in enumerate(jobs) for g in groups_for(job, n, h, device)]


def dilated_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    jobs: Sequence[PatternJob],
    *,
    causal: bool,
    scale: float,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged attention of ``jobs`` on contiguous ``(b, n, h, d)`` inputs; no autograd.

    Returns ``out`` ``(b, n, h, d)`` in float32 (float64 for float64 inputs) and ``lse`` ``(b, n, h)``
    in the same dtype. ``out`` may be given as a workspace of that shape and dtype (it is overwritten).
    """
    b, n, h, d = q.shape
    ct = compute_dtype(q.dtype)
    if out is None:
        out = torch.zeros(b, n, h, v.shape[-1], dtype=ct, device=q.device)
    else:
        out.zero_()
    lse = torch.full((b, n, h), float("-inf"), dtype=ct, device=q.device)
    finite = all_finite(q, k, v)
    for index, (job_index, group) in enumerate(_groups(jobs, n, h, q.device)):
        o, l = attention_forward(
            gather(q, group),
            gather(k, group),
            gather(v, group),
            causal=causal,
            scale=scale,
            bias=_padding_bias(key_padding_mask, group, ct),
            dropout_p=dropout_p,
            generator=_generator(dropout_seed, q.device, index),
            finite=finite,
        )
        o = o.to(ct).view(b, group.count, len(group.heads), group.rows_per_segment, -1)
        l = l.to(ct).view(b, group.count, len(group.heads), group.rows_per_segment)
        out_rows = segment_view(out, group)
        lse_rows = segment_view(lse, group)
        if job_index == 0:
            # The first job's groups cover disjoint rows that nothing has written yet.
            out_rows[:, :, group.flat] = o
            lse_rows[:, :, group.flat] = l
        else:
            merged_out, merged_lse = merge_lse(out_rows[:, :, group.flat], lse_rows[:, :, group.flat], o, l)
            out_rows[:, :, group.flat] = merged_out
            lse_rows[:, :, group.flat] = merged_lse
    return out, lse


def dilated_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    jobs: Sequence[PatternJob],
    *,
    causal: bool,
    scale: float,
    dlse: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``q, k, v`` for ``jobs`` given the merged ``out`` and ``lse`` of the rows.

    All tensors ``(b, n, h, ...)`` contiguous; returns float32 (float64) gradients.
    """
    b, n, h, d = q.shape
    ct = compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=ct, device=q.device)
    dk = torch.zeros(k.shape, dtype=ct, device=q.device)
    dv = torch.zeros(v.shape, dtype=ct, device=q.device)
    finite = all_finite(dout, q, k, v)
    for index, (_, group) in enumerate(_groups(jobs, n, h, q.device)):
        shape = (b * group.count, len(group.heads), group.rows_per_segment)
        gq, gk, gv = attention_backward(
            gather(dout, group),
            gather(q, group),
            gather(k, group),
            gather(v, group),
            gather(out, group),
            segment_view(lse, group)[:, :, group.flat].reshape(shape),
            causal=causal,
            scale=scale,
            bias=_padding_bias(key_padding_mask, group, ct),
            dlse=None if dlse is None else segment_view(dlse, group)[:, :, group.flat].reshape(shape),
            dropout_p=dropout_p,
            generator=_generator(dropout_seed, q.device, index),
            finite=finite,
        )
        for acc, grad in ((dq, gq), (dk, gk), (dv, gv)):
            rows = segment_view(acc, group)
            rows[:, :, group.flat] += grad.to(ct).view(
                b, group.count, len(group.heads), group.rows_per_segment, -1
            )
    return dq, dk, dv


@cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _whole_head_ranges(jobs: Sequence[PatternJob]) -> bool:
    """Each job's heads a contiguous range, any two jobs' heads equal or disjoint (one launch each)."""
    for job in jobs:
        if job.heads != tuple(range(job.heads[0], job.heads[0] + len(job.heads))):
            return False
    sets = {frozenset(job.heads) for job in jobs}
    return all(a == b or a.isdisjoint(b) for a in sets for b in sets)


def fused_applies(q: torch.Tensor, jobs: Sequence[PatternJob]) -> bool:
    """Whether ``local_forward``/``local_backward`` run ``jobs`` on ``q``'s kind of tensor fused.

    CUDA tensors, or CPU tensors while the kernels run on Triton's interpreter (``TRITON_INTERPRET=1``,
    for tests); fp16, bf16 or fp32; head_dim 16..256; heads in whole ranges.
    """
    lo, hi = _FUSED_HEAD_DIMS
    if q.dtype not in _FUSED_DTYPES or not lo <= q.shape[-1] <= hi or not jobs:
        return False
    if not _triton_installed() or not _whole_head_ranges(jobs):
        return False
    if q.is_cuda:
        return True
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        from dilated_attn.kernels.tuning import interpreting

        return interpreting()
    return False


def local_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    jobs: Sequence[PatternJob],
    *,
    causal: bool,
    scale: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dilated_forward``'s result, on the fused kernels where ``fused_applies``, else by gathering.

    Contiguous ``(b, n, h, d)`` inputs. Returns ``out`` ``(b, n, h, d)`` in ``out_dtype`` (default:
    float32, float64 for float64 inputs) and ``lse`` ``(b, n, h)`` float32 (float64 for float64).
    """
    ct = compute_dtype(q.dtype)
    dtype = ct if out_dtype is None else out_dtype
    if fused_applies(q, jobs):
        from dilated_attn.kernels.jobs import fused_forward

        return fused_forward(q, k, v, jobs, causal=causal, scale=scale, out_dtype=dtype)
    out, lse = dilated_forward(q, k, v, jobs, causal=causal, scale=scale)
    return out.to(dtype), lse


def local_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    jobs: Sequence[PatternJob],
    *,
    causal: bool,
    scale: float,
    dlse: torch.Tensor | None = None,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dilated_backward``'s gradients from the merged ``out`` and ``lse``, on ``local_forward``'s path.

    Gradients in ``grad_dtype`` (default: float32, float64 for float64 inputs).
    """
    dtype = compute_dtype(q.dtype) if grad_dtype is None else grad_dtype
    if fused_applies(q, jobs):
        from dilated_attn.kernels.jobs import fused_backward

        return fused_backward(
            dout, q, k, v, out, lse, dlse, jobs, causal=causal, scale=scale, grad_dtype=dtype
        )
    grads = dilated_backward(dout, q, k, v, out, lse, jobs, causal=causal, scale=scale, dlse=dlse)
    return grads[0].to(dtype), grads[1].to(dtype), grads[2].to(dtype)
