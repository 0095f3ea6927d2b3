"""A NaN input reaches the fused kernels' outputs as NaN, never as a silent zero (interpreter on CPU).

NaN in ``q`` or ``k`` gives NaN in exactly the rows that attend through it, as on the other backends.
NaN in ``v`` gives NaN in every row that reaches it and, like ``scaled_dot_product_attention``'s math
(masked probabilities 0 times NaN), possibly in other rows of the same tile.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from dilated_attn import dilated_attention, hookimpl  # noqa: E402
from dilated_attn.backends.triton import HEAD_DIMS, triton_backend  # noqa: E402
from dilated_attn.kernels import tuning  # noqa: E402
from dilated_attn.pattern import DilationPattern  # noqa: E402
from dilated_attn.reference import multiplicity  # noqa: E402
from dilated_attn.registry import get_registry  # noqa: E402

pytestmark = pytest.mark.skipif(
    not tuning.interpreting() and not torch.cuda.is_available(), reason="needs CUDA or TRITON_INTERPRET=1"
)
W, R = [8, 16], [1, 2]


class _Plugin:
    @hookimpl
    def dilated_attn_register_attention(self, register):
        register(
            "triton-nan-check",
            triton_backend,
            devices=("cpu",),
            dtypes=(torch.float32,),
            head_dims=HEAD_DIMS,
            auto=False,
        )


@pytest.fixture(scope="module", autouse=True)
def backend():
    name = get_registry().register(_Plugin(), name="triton-nan-check")
    yield
    get_registry().unregister(name)


def _run(q, k, v, causal):
    name = "triton" if q.is_cuda else "triton-nan-check"
    return dilated_attention(q, k, v, W, R, causal=causal, backend=name)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("position", [3, 17])
def test_nan_reaches_its_rows(which, position, causal):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(position)
    q, k, v = (torch.randn(1, 29, 2, 16, generator=g).to(device) for _ in range(3))
    head = 1
    {"q": q, "k": k, "v": v}[which][0, position, head] = float("nan")
    out = _run(q, k, v, causal)[0, :, head].cpu()
    c = multiplicity(29, 2, DilationPattern(W, R), "longnet", causal)[head]
    reached = (c[:, position] > 0) if which != "q" else torch.arange(29) == position
    nan_rows = torch.isnan(out).any(dim=-1)
    assert nan_rows[reached].all(), "a row that attends through the NaN must be NaN, never a silent value"
    if which != "v":
        assert not nan_rows[~reached].any(), "a NaN in q or k must stay in the rows it reaches"
    # The other head never sees it.
    assert torch.isfinite(_run(q, k, v, causal)[0, :, 0]).all()
