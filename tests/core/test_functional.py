"""The functional API and the portable "sdpa" backend against the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from dilated_attn import dilated_attention
from dilated_attn.cache import metadata_cache
from dilated_attn.ops import dilated_backward, dilated_forward, jobs_for
from dilated_attn.pattern import DilationPattern
from dilated_attn.reference import dilated_attention_reference
from dilated_attn.testing import TOLERANCES, BackendConformance, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st


class TestSdpaConformance(BackendConformance):
    backend = "sdpa"
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class TestReferenceConformance(BackendConformance):
    backend = "reference"
    dtypes = (torch.float64,)


@st.composite
def problems(draw):
    k = draw(st.integers(1, 4))
    w = draw(st.lists(st.integers(1, 70), min_size=k, max_size=k))
    r = [draw(st.integers(1, min(wi, 6))) for wi in w]
    return dict(
        b=draw(st.integers(1, 2)),
        n=draw(st.integers(1, 90)),
        h=draw(st.integers(1, 6)),
        d=draw(st.sampled_from([4, 8, 16])),
        w=w,
        r=r,
        mode=draw(st.sampled_from(["longnet", "head_groups"])),
        causal=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=60, deadline=None)
@given(problems())
def test_random_problems_match_oracle_with_gradients(p):
    g = torch.Generator().manual_seed(p["seed"])
    shape = (p["b"], p["n"], p["h"], p["d"])
    q, k, v = (torch.randn(shape, generator=g, requires_grad=True) for _ in range(3))
    out, lse = dilated_attention(
        q, k, v, p["w"], p["r"], mode=p["mode"], causal=p["causal"], return_lse=True, backend="sdpa"
    )
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = dilated_attention_reference(
        q64, k64, v64, p["w"], p["r"], mode=p["mode"], causal=p["causal"], return_lse=True
    )
    assert relative_error(out, ref) <= 1e-5
    assert relative_error(lse, ref_lse) <= 1e-5
    grad = torch.randn(shape, generator=g)
    (out * grad).sum().backward()
    (ref * grad.double()).sum().backward()
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        assert relative_error(ours.grad, theirs.grad) <= 1e-4


def test_gradcheck_float64():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 11, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for mode in ("longnet", "head_groups"):
        for causal in (False, True):
            assert torch.autograd.gradcheck(
                lambda a, b, c, mode=mode, causal=causal: dilated_attention(
                    a, b, c, [4, 6, 11], [1, 2, 3], mode=mode, causal=causal, backend="sdpa"
                ),
                (q, k, v),
            )


def test_gradients_through_lse_are_exact():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 19, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda a, b, c: dilated_attention(a, b, c, [5, 8], [1, 2], return_lse=True, backend="sdpa")[
            1
        ].masked_fill(
            torch.isneginf(dilated_attention_reference(a, b, c, [5, 8], [1, 2], return_lse=True)[1]), 0.0
        ),
        (q, k, v),
    )
    out, lse = dilated_attention(q, k, v, [5, 8], [1, 2], return_lse=True, backend="sdpa")
    ref, ref_lse = dilated_attention_reference(q, k, v, [5, 8], [1, 2], return_lse=True)
    weights = torch.randn_like(lse)
    grads = torch.autograd.grad((out.sum() + (lse * weights).sum()), (q, k, v))
    ref_grads = torch.autograd.grad((ref.sum() + (ref_lse * weights).sum()), (q, k, v))
    for ours, theirs in zip(grads, ref_grads):
        assert relative_error(ours, theirs) <= 1e-10


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask_matches_oracle(causal):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 30, 4, 8, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0, 21:] = True
    mask[1, ::7] = True
    out = dilated_attention(q, k, v, [8, 16], [1, 2], causal=causal, key_padding_mask=mask)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = dilated_attention_reference(q64, k64, v64, [8, 16], [1, 2], causal=causal, key_padding_mask=mask)
    assert relative_error(out, ref) <= 1e-5
    out.sum().backward()
    ref.sum().backward()
    assert relative_error(k.grad, k64.grad) <= 1e-4
    assert torch.all(k.grad[mask] == 0), "padded keys must receive no gradient"


def test_dropout_forward_and_backward_agree():
    # With the dropout seed fixed the op is deterministic, so finite differences check the backward.
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 16, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    jobs = jobs_for(DilationPattern([4, 16], [1, 2]), 16, 2, "longnet")

    class Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, c):
            out, lse = dilated_forward(a, b, c, jobs, causal=False, scale=0.5, dropout_p=0.3, dropout_seed=11)
            ctx.save_for_backward(a, b, c, out, lse)
            return out

        @staticmethod
        def backward(ctx, dout):
            a, b, c, out, lse = ctx.saved_tensors
            return dilated_backward(
                dout, a, b, c, out, lse, jobs, causal=False, scale=0.5, dropout_p=0.3, dropout_seed=11
            )

    assert torch.autograd.gradcheck(Op.apply, (q, k, v))
    dropped = Op.apply(q, k, v)
    plain = dilated_attention(q, k, v, [4, 16], [1, 2], scale=0.5)
    assert not torch.allclose(dropped, plain)


def test_dropout_is_unbiased():
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 32, 2, 8) for _ in range(3))
    plain = dilated_attention(q, k, v, [8, 32], [1, 2])
    mean = torch.stack([dilated_attention(q, k, v, [8, 32], [1, 2], dropout_p=0.2) for _ in range(400)]).mean(
        0
    )
    assert relative_error(mean, plain) < 0.05


def test_no_nan_for_large_scores_and_empty_rows():
    q = torch.full((1, 20, 3, 8), 40.0, requires_grad=True)
    out, lse = dilated_attention(q, q, q, [4, 10], [2, 5], return_lse=True, backend="sdpa")
    assert not torch.isnan(out).any()
    assert torch.isneginf(lse).any()
    out.sum().backward()
    assert not torch.isnan(q.grad).any()


def test_plans_are_built_once_per_shape():
    q = torch.randn(1, 77, 3, 8)
    dilated_attention(q, q, q, [7, 11], [1, 2], backend="sdpa")
    plans = metadata_cache("core.gather_plans")
    before = plans.stats()
    for _ in range(3):
        dilated_attention(q, q, q, [7, 11], [1, 2], backend="sdpa")
    after = plans.stats()
    assert after["misses"] == before["misses"] and after["hits"] == before["hits"] + 3 * 2


def test_bad_arguments_name_the_rule():
    q = torch.randn(1, 16, 2, 8)
    with pytest.raises(ValueError, match="mode='sparse' must be one of"):
        dilated_attention(q, q, q, [8], [1], mode="sparse")
    with pytest.raises(ValueError, match=r"dropout_p=1.5 must be in \[0, 1\)"):
        dilated_attention(q, q, q, [8], [1], dropout_p=1.5)
    with pytest.raises(ValueError, match="scale=-1.0 must be a finite positive number"):
        dilated_attention(q, q, q, [8], [1], scale=-1.0)
    with pytest.raises(
        ValueError, match="backend='nope' is not a registered attention backend; known backends"
    ):
        dilated_attention(q, q, q, [8], [1], backend="nope")
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        dilated_attention(q.numpy(), q, q, [8], [1])
    with pytest.raises(ValueError, match=r"key_padding_mask.shape=\(1, 8\) must be"):
        dilated_attention(q, q, q, [8], [1], key_padding_mask=torch.zeros(1, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask.dtype"):
        dilated_attention(q, q, q, [8], [1], key_padding_mask=torch.zeros(1, 16))


def test_pool_workspace_gives_identical_results():
    from dilated_attn.pool import PythonBufferPool

    torch.manual_seed(7)
    pool = PythonBufferPool()
    q, k, v = (torch.randn(1, 40, 3, 8, requires_grad=True) for _ in range(3))
    plain = dilated_attention(q, k, v, [8, 40], [1, 2], backend="sdpa")
    for _ in range(3):
        pooled = dilated_attention(q, k, v, [8, 40], [1, 2], backend="sdpa", pool=pool)
        assert torch.equal(pooled, plain)
    stats = pool.stats()
    assert stats["hits"] >= 2 and stats["in_use_bytes"] == 0
    pooled.sum().backward()
    assert q.grad is not None


@pytest.mark.parametrize("used", ["out", "lse"])
def test_sdpa_backward_takes_fused_blocks_when_no_gradient_reaches_the_lse(used, monkeypatch):
    # An output the loss never reaches gets no gradient (not a zero one): with only ``out`` used the
    # blocks' backward runs on PyTorch's fused kernel, not the math path a gradient into the LSE needs.
    import dilated_attn.block_attention as blocks

    math_calls = []
    real = blocks._math_backward
    monkeypatch.setattr(blocks, "_math_backward", lambda *a, **k: math_calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 96, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    out, lse = dilated_attention(q, k, v, [32, 96], [1, 3], backend="sdpa", return_lse=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = dilated_attention_reference(q64, k64, v64, [32, 96], [1, 3], return_lse=True)
    weight = torch.randn(out.shape if used == "out" else lse.shape, generator=g)
    ours = torch.autograd.grad(((out if used == "out" else lse) * weight).sum(), (q, k, v))
    # The LSE does not depend on V: its gradient is zero there.
    leaves = (q64, k64, v64) if used == "out" else (q64, k64)
    theirs = torch.autograd.grad(((ref if used == "out" else ref_lse) * weight.double()).sum(), leaves)
    for a, b in zip(ours, theirs):
        assert relative_error(a, b) <= TOLERANCES[torch.float32][1]
    if used == "lse":
        assert torch.count_nonzero(ours[2]) == 0
    assert bool(math_calls) == (used == "lse")
