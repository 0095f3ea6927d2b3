"""The fused kernels on a tuple of pattern jobs, for composers (ring attention's local segments).

``fused_forward`` and ``fused_backward`` are the kernels of the "triton" backend driven by
``PatternJob``\\ s instead of a pattern and a mode, so a composer can run any subset of the patterns
and heads on a slice of rows. They are plain functions (no autograd): the backward takes the
*merged* ``out`` and ``lse`` of the rows and the gradient reaching ``lse``, so a caller that merges
further partial results into these rows (by ``dilated_attn.ops.merge_lse``) gets exact gradients.

Every call starts its outputs afresh (its first launch on each head writes, later ones merge), so the
autotuner, which re-runs the first launch it sees with a new key, never re-runs a merging launch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from dilated_attn.cache import metadata_cache
from dilated_attn.kernels.backward import backward
from dilated_attn.kernels.forward import forward_launch
from dilated_attn.kernels.launches import LaunchPlan, plan_jobs
from dilated_attn.pattern import PatternJob

_JOB_LAUNCHES = metadata_cache("core.job_launches")


def _launches(jobs: tuple[PatternJob, ...], num_heads: int) -> LaunchPlan:
    def build() -> LaunchPlan:
        plan = plan_jobs(jobs)
        covered = {j for job in jobs for j in job.heads}
        # Heads no job covers keep zero output and -inf LSE (zero gradients): start them initialised.
        uncovered = covered != set(range(num_heads))
        return LaunchPlan(plan.launches, plan.needs_init or uncovered, plan.kv_needs_init or uncovered)

    return _JOB_LAUNCHES.get_or_build(
        (jobs, num_heads), build, nbytes=lambda plan: 128 * (1 + len(plan.launches))
    )


def _device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def fused_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    jobs: Sequence[PatternJob],
    *,
    causal: bool,
    scale: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged attention of ``jobs`` on ``(b, n, h, d)`` inputs of one dtype (fp16, bf16 or fp32).

    Returns ``out`` ``(b, n, h, d)`` in ``out_dtype`` (default: the inputs' dtype; float32 keeps a
    result that more partial results will be merged into at full precision) and ``lse``
    ``(b, n, h)`` float32. Rows and heads no job selects get zero output and ``-inf`` LSE.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, n, h, _ = q.shape
    plan = _launches(tuple(jobs), h)
    dtype = q.dtype if out_dtype is None else out_dtype
    if plan.needs_init:
        out = torch.zeros(q.shape, dtype=dtype, device=q.device)
        lse = torch.full((b, n, h), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        lse = torch.empty((b, n, h), dtype=torch.float32, device=q.device)
    with _device_guard(q):
        for launch in plan.launches:
            forward_launch(q, k, v, out, lse, launch, causal=causal, scale=scale)
    return out, lse


def fused_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    jobs: Sequence[PatternJob],
    *,
    causal: bool,
    scale: float,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of ``jobs`` from the merged ``out`` and ``lse`` of the rows.

    ``dout, q, k, v, out`` ``(b, n, h, d)`` (``out`` in any floating dtype), ``lse`` and ``dlse``
    ``(b, n, h)`` float32 (``dlse=None``: no gradient reaches the LSE). Gradients come in
    ``grad_dtype`` (default: the inputs' dtype); float32 keeps them exact for a caller that adds
    further contributions.
    """
    dout, q, k, v, out, lse = (t.contiguous() for t in (dout, q, k, v, out, lse))
    plan = _launches(tuple(jobs), q.shape[2])
    with _device_guard(q):
        return backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            None if dlse is None else dlse.contiguous(),
            plan,
            causal=causal,
            scale=scale,
            grad_dtype=grad_dtype,
        )


__all__ = ["fused_backward", "fused_forward"]
