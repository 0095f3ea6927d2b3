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

from collections.abc import Sequence

import torch

from dilated_attn.cache import metadata_cache
from dilated_attn.kernels.backward import backward
from dilated_attn.kernels.forward import forward
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
    return forward(
        q, k, v, _launches(tuple(jobs), q.shape[2]), causal=causal, scale=scale, out_dtype=out_dtype
    )


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
    plan = _launches(tuple(jobs), q.shape[2])
    return backward(dout, q, k, v, out, lse, dlse, plan, causal=causal, scale=scale, grad_dtype=grad_dtype)


__all__ = ["fused_backward", "fused_forward"]
