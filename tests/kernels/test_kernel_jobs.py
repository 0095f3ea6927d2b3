"""``dilated_attn.kernels.jobs`` (the fused kernels driven by pattern jobs) against the gather path.

Composers hand the kernels any subset of the jobs and heads and merge further partial results into
the rows, so the checks run head subsets, rows no job selects, an ``out``/``lse`` merged with another
partial result before the backward, a gradient reaching ``lse``, and then the float64 oracle. Without
CUDA the kernels run on Triton's CPU interpreter at small sizes, in float32.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from dilated_attn.kernels import tuning  # noqa: E402
from dilated_attn.kernels.jobs import fused_backward, fused_forward  # noqa: E402
from dilated_attn.ops import (  # noqa: E402
    PatternJob,
    dilated_backward,
    dilated_forward,
    fused_applies,
    jobs_for,
    local_backward,
    local_forward,
    merge_lse,
)
from dilated_attn.pattern import DilationPattern  # noqa: E402
from dilated_attn.reference import dilated_attention_reference  # noqa: E402
from dilated_attn.testing import TOLERANCES, relative_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runs = pytest.mark.skipif(
    DEVICE == "cpu" and not tuning.interpreting(),
    reason="CPU checks need the kernels imported under TRITON_INTERPRET=1",
)

# name -> (n, heads, jobs): head subsets, heads no job covers, no r = 1, a partial last segment.
JOB_SETS: dict[str, tuple[int, int, tuple[PatternJob, ...]]] = {
    "all-heads": (
        40,
        3,
        (PatternJob(8, 1, (0, 1, 2)), PatternJob(16, 2, (0, 1, 2)), PatternJob(40, 4, (0, 1, 2))),
    ),
    "head-subset": (36, 4, (PatternJob(12, 2, (1, 2)), PatternJob(36, 3, (1, 2)))),
    "disjoint-groups": (
        33,
        5,
        (PatternJob(6, 1, (0, 1)), PatternJob(12, 2, (2, 3)), PatternJob(33, 4, (4,))),
    ),
    "no-r1-partial-segment": (29, 2, (PatternJob(10, 3, (0, 1)), PatternJob(20, 2, (0, 1)))),
}


def _inputs(n: int, h: int, d: int, seed: int, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, h, d, generator=g, dtype=torch.float64) for _ in range(4)] + [
        torch.randn(batch, n, h, generator=g, dtype=torch.float64)
    ]


@runs
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", sorted(JOB_SETS))
def test_fused_jobs_match_the_gather_path(name: str, causal: bool) -> None:
    n, h, jobs = JOB_SETS[name]
    q64, k64, v64, dout64, dlse64 = _inputs(n, h, 16, seed=sum(map(ord, name)) + causal)
    q, k, v, dout = (t.float().to(DEVICE) for t in (q64, k64, v64, dout64))
    scale = 16**-0.5
    out, lse = fused_forward(q, k, v, jobs, causal=causal, scale=scale, out_dtype=torch.float32)
    ref_out, ref_lse = dilated_forward(q64, k64, v64, jobs, causal=causal, scale=scale)
    fwd_tol, grad_tol = TOLERANCES[torch.float32]
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert relative_error(out.cpu(), ref_out) <= fwd_tol
    assert relative_error(lse.cpu(), ref_lse) <= fwd_tol
    # Rows or heads nothing selects: zero output, -inf LSE, as the gather path leaves them.
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse.cpu()), empty)
    assert torch.all(out.cpu()[empty] == 0)

    finite = ~empty
    dlse64 = torch.where(finite, dlse64, 0.0)
    grads = fused_backward(
        dout, q, k, v, out, lse, dlse64.float().to(DEVICE), jobs, causal=causal, scale=scale,
        grad_dtype=torch.float32,
    )  # fmt: skip
    expected = dilated_backward(
        dout64, q64, k64, v64, ref_out, ref_lse, jobs, causal=causal, scale=scale, dlse=dlse64
    )
    for label, ours, theirs in zip("qkv", grads, expected):
        err = relative_error(ours.cpu(), theirs)
        assert err <= grad_tol, f"d{label}: relative error {err:.3e} > {grad_tol:g}"


@runs
@pytest.mark.parametrize("mode", ["longnet", "head_groups"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_merged_with_another_part_the_gradients_match_the_oracle(mode: str, causal: bool) -> None:
    """Two job subsets run apart, merged by LSE, then each backward with the merged out and lse:
    the sum of their gradients is the oracle's for the whole pattern (the ring's rule)."""
    n, h, d = 45, 4, 16
    pattern = DilationPattern([6, 15, 45], [1, 3, 5])
    jobs = jobs_for(pattern, n, h, mode)
    first, second = jobs[:1], jobs[1:]
    q64, k64, v64, dout64, dlse64 = _inputs(n, h, d, seed=7 + causal + 2 * (mode == "longnet"))
    q, k, v, dout = (t.float().to(DEVICE) for t in (q64, k64, v64, dout64))
    scale = d**-0.5
    out_a, lse_a = fused_forward(q, k, v, first, causal=causal, scale=scale, out_dtype=torch.float32)
    out_b, lse_b = fused_forward(q, k, v, second, causal=causal, scale=scale, out_dtype=torch.float32)
    out, lse = merge_lse(out_a, lse_a, out_b, lse_b)

    q_ref, k_ref, v_ref = (t.clone().requires_grad_() for t in (q64, k64, v64))
    ref, ref_lse = dilated_attention_reference(
        q_ref, k_ref, v_ref, pattern, mode=mode, causal=causal, scale=scale, return_lse=True
    )
    fwd_tol, grad_tol = TOLERANCES[torch.float32]
    assert relative_error(out.cpu(), ref) <= fwd_tol
    assert relative_error(lse.cpu(), ref_lse) <= fwd_tol

    finite = torch.isfinite(ref_lse)
    dlse = torch.where(finite, dlse64, 0.0)
    ((ref * dout64).sum() + (torch.where(finite, ref_lse, 0.0) * dlse).sum()).backward()
    parts = [
        fused_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            dlse.float().to(DEVICE),
            part,
            causal=causal,
            scale=scale,
            grad_dtype=torch.float32,
        )  # fmt: skip
        for part in (first, second)
    ]
    for i, (label, theirs) in enumerate(zip("qkv", (q_ref.grad, k_ref.grad, v_ref.grad))):
        err = relative_error((parts[0][i] + parts[1][i]).cpu(), theirs)
        assert err <= grad_tol, f"d{label}: relative error {err:.3e} > {grad_tol:g}"


@runs
def test_outputs_default_to_the_input_dtype() -> None:
    n, h, jobs = JOB_SETS["head-subset"]
    q, k, v, dout, _ = (t.to(DEVICE, torch.float16) for t in _inputs(n, h, 16, seed=3))
    out, lse = fused_forward(q, k, v, jobs, causal=False, scale=0.25)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    grads = fused_backward(dout, q, k, v, out, lse, None, jobs, causal=False, scale=0.25)
    assert all(g.dtype == torch.float16 for g in grads)
    ref_out, _ = dilated_forward(*(t.double() for t in (q, k, v)), jobs, causal=False, scale=0.25)
    assert relative_error(out.cpu(), ref_out.cpu()) <= TOLERANCES[torch.float16][0]


@runs
def test_local_entry_points_choose_the_path_by_the_inputs() -> None:
    n, h, jobs = JOB_SETS["all-heads"]
    q32 = torch.zeros(1, n, h, 16, device=DEVICE)
    assert fused_applies(q32, jobs)
    # float64, head sizes outside 16..256 and heads not in whole ranges take the gather path.
    assert not fused_applies(q32.double(), jobs)
    assert not fused_applies(torch.zeros(1, n, h, 8, device=DEVICE), jobs)
    assert not fused_applies(q32, (PatternJob(8, 1, (0, 2)),))
    assert not fused_applies(q32, (PatternJob(8, 1, (0, 1)), PatternJob(8, 2, (1, 2))))

    q64, k64, v64, dout64, _ = _inputs(n, h, 8, seed=11)
    out, lse = local_forward(q64, k64, v64, jobs, causal=True, scale=0.3)
    ref_out, ref_lse = dilated_forward(q64, k64, v64, jobs, causal=True, scale=0.3)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    grads = local_backward(dout64, q64, k64, v64, out, lse, jobs, causal=True, scale=0.3)
    expected = dilated_backward(dout64, q64, k64, v64, out, lse, jobs, causal=True, scale=0.3)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected))

    q, k, v, dout = (t.float().to(DEVICE) for t in _inputs(n, h, 16, seed=12)[:4])
    out, lse = local_forward(q, k, v, jobs, causal=False, scale=0.25, out_dtype=torch.float32)
    fused_out, fused_lse = fused_forward(q, k, v, jobs, causal=False, scale=0.25, out_dtype=torch.float32)
    assert torch.equal(out, fused_out) and torch.equal(lse, fused_lse)
    grads = local_backward(dout, q, k, v, out, lse, jobs, causal=False, scale=0.25)
    assert all(g.dtype == torch.float32 for g in grads)
    fused = fused_backward(dout, q, k, v, out, lse, None, jobs, causal=False, scale=0.25)
    assert all(torch.equal(a, b) for a, b in zip(grads, fused))
