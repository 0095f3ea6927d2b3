"""Property test: ``dilated_attention`` (backend "auto", the "sdpa" backend on CPU) and its gradients
equal the float64 oracle on random problems, within the tolerances of ``dilated_attn.testing``.

Drawn: 1-4 patterns (w in 1..40, r in 1..w), lengths 1..60, 1-6 query heads with a number of K/V
heads that divides them, head_dim 8 or 16, float32/float64/bfloat16/float16, causal or not, both
modes, an optional key padding mask. Kept to a few dozen examples so that CI runs it.
"""

from __future__ import annotations

import pytest
import torch
from dilated_attn import dilated_attention
from dilated_attn.reference import dilated_attention_reference
from dilated_attn.testing import TOLERANCES, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@st.composite
def problems(draw: st.DrawFn) -> dict:
    k = draw(st.integers(1, 4))
    w = draw(st.lists(st.integers(1, 40), min_size=k, max_size=k))
    r = [draw(st.integers(1, wi)) for wi in w]
    h = draw(st.integers(1, 6))
    h_kv = draw(st.sampled_from([x for x in range(1, h + 1) if h % x == 0]))
    return dict(
        b=draw(st.integers(1, 2)),
        n=draw(st.integers(1, 60)),
        h=h,
        h_kv=h_kv,
        d=draw(st.sampled_from([8, 16])),
        w=w,
        r=r,
        dtype=draw(st.sampled_from(DTYPES)),
        mode=draw(st.sampled_from(["longnet", "head_groups"])),
        causal=draw(st.booleans()),
        padding=draw(st.sampled_from([0.0, 0.2, 0.6])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# Derandomized: CI sees the same 40 problems every run, so a rare ill-conditioned draw (below) cannot
# fail one run and pass the next; drop derandomize locally to explore further.
@settings(max_examples=40, deadline=None, derandomize=True)
@given(problems())
def test_function_and_gradients_match_the_oracle(p: dict) -> None:
    _check_problem(p)


@pytest.mark.xfail(
    strict=True,
    reason="known precision defect: bf16 gradients are formed with D = rowsum(dO * O) from the bf16-rounded "
    "output, which on rows whose score gradients nearly cancel leaves dq/dk 3.8e-2 / 6.5e-2 from the "
    "oracle (fp16 3.4e-3); found by the property test above",
)
def test_bf16_gradients_where_the_score_gradients_cancel() -> None:
    _check_problem(
        {"b": 1, "n": 12, "h": 2, "h_kv": 2, "d": 16, "w": [8, 1], "r": [3, 1], "dtype": torch.bfloat16,
         "mode": "head_groups", "causal": True, "padding": 0.2, "seed": 3733}
    )  # fmt: skip


def _check_problem(p: dict) -> None:
    dtype = p["dtype"]
    fwd_tol, grad_tol = TOLERANCES[dtype]
    g = torch.Generator().manual_seed(p["seed"])
    b, n, h, h_kv, d = p["b"], p["n"], p["h"], p["h_kv"], p["d"]
    q = torch.randn(b, n, h, d, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(b, n, h_kv, d, generator=g).to(dtype).requires_grad_() for _ in range(2))
    mask = (torch.rand(b, n, generator=g) < p["padding"]) if p["padding"] else None
    kwargs = dict(mode=p["mode"], causal=p["causal"], key_padding_mask=mask, return_lse=True)
    out, lse = dilated_attention(q, k, v, p["w"], p["r"], **kwargs)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = dilated_attention_reference(q64, k64, v64, p["w"], p["r"], **kwargs)

    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    err = relative_error(out, ref)
    assert err <= fwd_tol, f"forward relative error {err:.3e} > {fwd_tol:g}"
    err = relative_error(lse, ref_lse)
    assert err <= fwd_tol, f"lse relative error {err:.3e} > {fwd_tol:g}"
    assert torch.all(out.detach()[torch.isneginf(ref_lse)] == 0), "rows with no keys must output 0"

    grad = torch.randn(b, n, h, d, generator=g).to(dtype)
    (out * grad).sum().backward()
    (ref * grad.double()).sum().backward()
    for name, ours, theirs in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        err = relative_error(ours.grad, theirs.grad)
        assert err <= grad_tol, f"d{name} relative error {err:.3e} > {grad_tol:g}"
