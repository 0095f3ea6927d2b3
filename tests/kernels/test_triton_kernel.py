"""The fused Triton kernels against the float64 oracle.

Without CUDA the kernels run on Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here before the
kernels are imported) at small sizes, in float32 and float16: the interpreter multiplies bfloat16
tiles as raw integer bit patterns (triton-lang/triton#11584), so bfloat16 is checked on the GPU only.
The GPU tests at medium sizes skip without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from dilated_attn import hookimpl  # noqa: E402
from dilated_attn.backends.triton import DTYPES, HEAD_DIMS, register_triton, triton_backend  # noqa: E402
from dilated_attn.functional import build_request, dilated_attention  # noqa: E402
from dilated_attn.kernels import op, tuning  # noqa: E402
from dilated_attn.kernels.launches import plan_launches  # noqa: E402
from dilated_attn.kernels.segments import ENGINE_ENV  # noqa: E402
from dilated_attn.reference import dilated_attention_reference  # noqa: E402
from dilated_attn.registry import get_registry  # noqa: E402
from dilated_attn.testing import TOLERANCES, BackendConformance, relative_error  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
interpreted = pytest.mark.skipif(
    not tuning.interpreting(), reason="CPU checks need the kernels imported under TRITON_INTERPRET=1"
)
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


class _InterpretedPlugin:
    """The kernels on CPU tensors, under another name: "triton" itself declares CUDA only."""

    @hookimpl
    def dilated_attn_register_attention(self, register):
        register(
            "triton-interpreted",
            triton_backend,
            devices=("cpu",),
            dtypes=(torch.float32, torch.float16),
            head_dims=HEAD_DIMS,
            gqa=True,
            auto=False,
        )


@pytest.fixture(scope="module", autouse=True)
def interpreted_backend():
    registry = get_registry()
    name = registry.register(_InterpretedPlugin(), name="test-triton-interpreted")
    try:
        yield
    finally:
        registry.unregister(name)


@pytest.fixture(autouse=True)
def triton_engine(monkeypatch):
    """The Triton kernels themselves: on a GPU the segment engine would otherwise take most calls
    (it has tests of its own in test_segments.py)."""
    monkeypatch.setenv(ENGINE_ENV, "triton")


def triton_dilated_attention(q, k, v, w, r, **kwargs):
    """The kernels through the front door: "triton" on CUDA tensors, the interpreter on CPU ones."""
    backend = "triton" if q.is_cuda else "triton-interpreted"
    return dilated_attention(q, k, v, w, r, backend=backend, **kwargs)


def _check(
    shape: tuple[int, int, int, int],
    w: list[int],
    r: list[int],
    *,
    mode: str,
    causal: bool,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
    kv_heads: int | None = None,
) -> None:
    """Forward, lse and gradients (through out and lse) of the kernels against the oracle.

    With ``kv_heads`` K/V have that many heads (grouped-query attention) and the oracle runs on them
    repeated to every query head; its K/V gradients sum over the repeats."""
    g = torch.Generator().manual_seed(seed)
    b, n, h, d = shape
    kv_shape = (b, n, h if kv_heads is None else kv_heads, d)
    q, k, v = (
        torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_()
        for s in (shape, kv_shape, kv_shape)
    )
    out, lse = triton_dilated_attention(q, k, v, w, r, mode=mode, causal=causal, return_lse=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    repeat = h // kv_shape[2]
    ref, ref_lse = dilated_attention_reference(
        q64,
        k64.repeat_interleave(repeat, dim=2),
        v64.repeat_interleave(repeat, dim=2),
        w,
        r,
        mode=mode,
        causal=causal,
        return_lse=True,
    )
    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert relative_error(out, ref) <= fwd_tol
    assert relative_error(lse, ref_lse) <= fwd_tol
    empty = torch.isneginf(ref_lse)
    assert torch.all(out.detach()[empty] == 0)

    grad_out = torch.randn(shape, generator=g).to(device)
    grad_lse = torch.randn(shape[:3], generator=g).to(device)
    finite = ~empty
    ((out.float() * grad_out).sum() + (lse[finite] * grad_lse[finite]).sum()).backward()
    ((ref * grad_out.double()).sum() + (ref_lse[finite] * grad_lse[finite].double()).sum()).backward()
    for name, ours, theirs in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        assert ours.grad.shape == ours.shape
        err = relative_error(ours.grad, theirs.grad)
        assert err <= grad_tol, f"d{name}: relative error {err:.3e} > {grad_tol:g}"


# -- launch plan --------------------------------------------------------------------------------


def test_plan_puts_dense_pattern_first_and_skips_init():
    plan = plan_launches(100, 4, [16, 32, 64], [2, 1, 4], "longnet")
    assert [(lc.segment, lc.dilation) for lc in plan.launches] == [(32, 1), (16, 2), (64, 4)]
    assert [lc.accumulate for lc in plan.launches] == [False, True, True]
    assert all((lc.head0, lc.num_heads) == (0, 4) for lc in plan.launches)
    assert not plan.needs_init


def test_plan_without_dense_pattern_needs_init():
    plan = plan_launches(100, 4, [16, 32], [2, 4], "longnet")
    assert plan.needs_init
    assert [lc.accumulate for lc in plan.launches] == [False, True]


def test_plan_head_groups():
    plan = plan_launches(50, 5, [8, 16, 64], [1, 2, 4], "head_groups")
    assert [(lc.head0, lc.num_heads, lc.dilation) for lc in plan.launches] == [
        (0, 2, 1),
        (2, 2, 2),
        (4, 1, 4),
    ]
    assert not any(lc.accumulate for lc in plan.launches)
    # Heads 2..4 start with r > 1, so their unselected rows must be zeroed first.
    assert plan.needs_init
    assert plan.launches[2].segment == 50  # W = min(w, n)
    # Fewer heads than patterns: the pattern whose group is empty is not launched.
    small = plan_launches(50, 2, [8, 16, 64], [1, 1, 1], "head_groups")
    assert [(lc.head0, lc.segment) for lc in small.launches] == [(0, 8), (1, 16)]
    assert not small.needs_init


def test_plan_grouped_kv_heads():
    # Without grouping the K/V flags are the query heads' own.
    for plan in (
        plan_launches(100, 4, [16, 32, 64], [2, 1, 4], "longnet"),
        plan_launches(50, 5, [8, 16, 64], [1, 2, 4], "head_groups"),
    ):
        assert [lc.kv_accumulate for lc in plan.launches] == [lc.accumulate for lc in plan.launches]
        assert plan.kv_needs_init == plan.needs_init
    # longnet: every launch covers every head, so K/V heads follow the query heads.
    plan = plan_launches(100, 6, [16, 32], [1, 4], "longnet", num_kv_heads=2)
    assert [lc.kv_accumulate for lc in plan.launches] == [False, True]
    assert not plan.kv_needs_init
    # head_groups, 6 query heads in pairs over 2 K/V heads of 3: heads {2, 3} read K/V heads 0 and 1.
    plan = plan_launches(61, 6, [8, 16, 61], [1, 2, 4], "head_groups", num_kv_heads=2)
    assert [(lc.head0, lc.accumulate, lc.kv_accumulate) for lc in plan.launches] == [
        (0, False, False),
        (2, False, True),
        (4, False, True),
    ]
    assert plan.needs_init and plan.kv_needs_init
    # r = 1 for every pair, but the pairs still share K/V heads: merged into, from zeros.
    plan = plan_launches(61, 6, [8, 16, 61], [1, 1, 1], "head_groups", num_kv_heads=2)
    assert [lc.kv_accumulate for lc in plan.launches] == [False, True, True]
    assert not plan.needs_init and plan.kv_needs_init
    # Groups aligned with the K/V heads: each K/V head has one launch, which writes it.
    plan = plan_launches(40, 4, [8, 40], [1, 2], "head_groups", num_kv_heads=2)
    assert not any(lc.kv_accumulate for lc in plan.launches)
    assert plan.kv_needs_init  # K/V head 1 starts with r = 2


@pytest.mark.parametrize("num_kv_heads", [0, 3, 5])
def test_plan_rejects_kv_heads_not_dividing(num_kv_heads):
    with pytest.raises(ValueError, match=rf"num_kv_heads={num_kv_heads} must divide num_heads=4"):
        plan_launches(30 + num_kv_heads, 4, [8], [1], "longnet", num_kv_heads=num_kv_heads)


# -- autotuning candidates ---------------------------------------------------------------------


def _shapes(configs):
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]


@pytest.mark.parametrize("kernel", ["forward", "dkdv", "dq"])
def test_pruner_tunes_large_calls_only(kernel, monkeypatch):
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    configs = tuning.configs_for(kernel)
    prune = tuning.pruner(kernel)
    for head_dim_pad, tier in ((32, 64), (64, 64), (128, 128), (256, 256)):
        candidates = tuning._CANDIDATES[kernel][tier]
        for tune_class in (1, 2):
            large = prune(
                configs,
                {"Q": torch.empty(0, dtype=torch.bfloat16), "tune_class": tune_class},
                HEAD_DIM_PAD=head_dim_pad,
            )
            assert sorted(_shapes(large)) == sorted(candidates)
        small = prune(
            configs, {"Q": torch.empty(0, dtype=torch.float16), "tune_class": 0}, HEAD_DIM_PAD=head_dim_pad
        )
        assert _shapes(small) == [candidates[0]]
        fp32 = prune(configs, {"Q": torch.empty(0), "tune_class": 1}, HEAD_DIM_PAD=head_dim_pad)
        assert _shapes(fp32) == list(tuning._FLOAT32[tier])


def test_tuning_class_depends_on_the_whole_call():
    assert tuning.tuning_class(1, 1 << 20, 16) == 2
    assert tuning.tuning_class(1, 1 << 18, 16) == 1
    assert tuning.tuning_class(2, 4099, 4) == 0
    assert tuning.tuning_class(1, tuning.TUNE_MIN_ROWS, 1) == 1
    assert tuning.tuning_class(1, tuning.TUNE_MIN_ROWS - 1, 1) == 0
    assert tuning.tuning_class(2, tuning.TUNE_LARGE_ROWS // 2, 1) == 2


# -- CPU interpreter ----------------------------------------------------------------------------

INTERPRETED_CASES = [
    # shape, w, r, mode: block edges (tiles 32 x 16), partial last segments, r not dividing W.
    ((1, 150, 2, 32), [32, 64, 150], [1, 2, 4], "longnet"),
    ((2, 77, 3, 16), [20, 40, 77], [1, 3, 5], "longnet"),
    # no r = 1: rows without keys; two patterns with the same (w, r) count twice.
    ((1, 101, 3, 32), [32, 64, 32], [2, 4, 2], "longnet"),
    # head_dim padded to the next power of two.
    ((1, 67, 2, 24), [16, 67], [1, 3], "longnet"),
    # more heads than patterns, group sizes 2, 2, 1.
    ((1, 90, 5, 16), [16, 45, 90], [1, 3, 6], "head_groups"),
]


@interpreted
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape, w, r, mode", INTERPRETED_CASES)
def test_interpreted_matches_oracle(shape, w, r, mode, dtype, causal):
    _check(shape, w, r, mode=mode, causal=causal, dtype=dtype, device="cpu")


# shape (b, n, h, d), K/V heads, w, r, mode: query head j reads K/V head j // (h / h_kv) with its own
# offset j % r, so a group of g query heads may select the same rows (r dividing g), partly the same
# (r and g coprime, or r < g not dividing it) or all different rows (r >= g) of one K/V head.
GQA_CASES = [
    # g = 2: r = 2 gives each pair both offsets; r = 4 > g.
    ((1, 67, 4, 16), 2, [16, 32, 67], [1, 2, 4], "longnet"),
    # g = 2 over 3 K/V heads, r = 3: the pairs' offsets are (0, 1), (2, 0), (1, 2).
    ((1, 77, 6, 16), 3, [20, 40, 77], [1, 3, 5], "longnet"),
    # multi-query (g = 4), no r = 1: rows without keys; r = 2 pairs heads, r = 3 pairs heads 0 and 3.
    ((1, 45, 4, 32), 1, [15, 45], [2, 3], "longnet"),
    # g = 3, two batches: r = 3 one head per offset, r = 2 heads {0, 2} and {3, 5} share rows.
    ((2, 53, 6, 16), 2, [8, 24, 53], [1, 3, 2], "longnet"),
    # head groups of 2 over K/V groups of 3: heads {2, 3} read K/V heads 0 and 1.
    ((1, 61, 6, 16), 2, [8, 16, 61], [1, 2, 4], "head_groups"),
    # head groups 2, 1, 1 over K/V pairs; head_dim padded to 32.
    ((1, 50, 4, 24), 2, [10, 50, 25], [2, 1, 5], "head_groups"),
]


@interpreted
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape, kv_heads, w, r, mode", GQA_CASES)
def test_interpreted_grouped_kv_heads_match_oracle(shape, kv_heads, w, r, mode, dtype, causal):
    _check(shape, w, r, mode=mode, causal=causal, dtype=dtype, device="cpu", kv_heads=kv_heads)


@interpreted
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape, w, r, mode", INTERPRETED_CASES)
def test_interpreted_tensor_descriptors_match_oracle(shape, w, r, mode, causal, monkeypatch):
    # The forward's tensor-descriptor path (bulk TMA copies on Hopper), forced on the interpreter.
    from dilated_attn.kernels import forward

    monkeypatch.setenv(tuning.TMA_ENV, "1")
    chosen = []
    real = forward.use_tma
    monkeypatch.setattr(forward, "use_tma", lambda *t: chosen.append(real(*t)) or chosen[-1])
    _check(shape, w, r, mode=mode, causal=causal, dtype=torch.float16, device="cpu")
    # Every launch takes the descriptors unless the head size is not one they copy whole.
    assert chosen and all(c == (shape[-1] in tuning._TMA_HEAD_DIMS) for c in chosen)


@interpreted
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape, kv_heads, w, r, mode", [GQA_CASES[2], GQA_CASES[4]])
def test_interpreted_tensor_descriptors_grouped_kv_heads(shape, kv_heads, w, r, mode, causal, monkeypatch):
    # Descriptors over the K/V head's rows (row stride r * h_kv * d), and in the backward one per
    # query head of a dK/dV program's group.
    monkeypatch.setenv(tuning.TMA_ENV, "1")
    _check(shape, w, r, mode=mode, causal=causal, dtype=torch.float16, device="cpu", kv_heads=kv_heads)


@interpreted
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "shape, kv_heads, w, r, mode",
    [(shape, None, w, r, mode) for shape, w, r, mode in INTERPRETED_CASES]
    + [GQA_CASES[1], GQA_CASES[4]]
    # segments of 16 and 32 in 150 tokens: the dQ accumulator covers 32 tokens at a time, then 22.
    + [
        ((2, 150, 3, 32), None, [16, 32], [1, 2], "longnet"),
        ((1, 150, 4, 16), 2, [16, 32], [2, 4], "head_groups"),
    ],
)
def test_interpreted_atomic_dq_matches_oracle(shape, kv_heads, w, r, mode, dtype, causal, monkeypatch):
    # dQ added by the dK/dV kernel into a float32 accumulator (no dQ kernel), through every pattern.
    from dilated_attn.kernels import backward

    monkeypatch.setenv(backward.DQ_ENV, "atomic")
    monkeypatch.setattr(backward, "_dq_tuned", [])  # indexing a list with a grid fails loudly
    _check(shape, w, r, mode=mode, causal=causal, dtype=dtype, device="cpu", kv_heads=kv_heads)


@interpreted
@pytest.mark.parametrize("used", ["out", "lse"])
def test_interpreted_gradient_through_one_output(used, monkeypatch):
    # The output no loss reaches gets no gradient at all (None, not zeros): both cases against the oracle.
    from dilated_attn.kernels import backward

    seen = []
    real = backward.compute_delta
    monkeypatch.setattr(
        backward, "compute_delta", lambda o, do, dlse, **kw: seen.append(dlse) or real(o, do, dlse, **kw)
    )
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 77, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    out, lse = triton_dilated_attention(q, k, v, [20, 77], [1, 3], causal=True, return_lse=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = dilated_attention_reference(q64, k64, v64, [20, 77], [1, 3], causal=True, return_lse=True)
    weight = torch.randn(out.shape if used == "out" else lse.shape, generator=g)
    ours = torch.autograd.grad(((out if used == "out" else lse) * weight).sum(), (q, k, v))
    # The LSE does not depend on V: its gradient is zero there.
    leaves = (q64, k64, v64) if used == "out" else (q64, k64)
    theirs = torch.autograd.grad(((ref if used == "out" else ref_lse) * weight.double()).sum(), leaves)
    for a, b in zip(ours, theirs):
        assert relative_error(a, b) <= TOLERANCES[torch.float32][1]
    if used == "lse":
        assert torch.count_nonzero(ours[2]) == 0
    # No gradient reaches the unused output: the kernels get None, not a zero tensor.
    assert len(seen) == 1 and (seen[0] is None) == (used == "out")


def test_dq_chunks_hold_whole_segments():
    from dilated_attn.kernels.backward import DQ_CHUNKS, dq_chunk

    plan = plan_launches(150, 3, [16, 32], [1, 2], "longnet")
    assert dq_chunk(150, plan) == 32
    plan = plan_launches(1 << 20, 16, [2048, 4096, 32768], [1, 2, 16], "longnet")
    assert dq_chunk(1 << 20, plan) == (1 << 20) // DQ_CHUNKS
    plan = plan_launches(3000, 2, [1000, 3000], [1, 3], "longnet")
    assert dq_chunk(3000, plan) == 3000  # lcm(1000, 3000) covers it all
    plan = plan_launches(100, 2, [60, 40], [1, 2], "longnet")
    assert dq_chunk(100, plan) == 100  # lcm(60, 40) = 120 > n


def test_dq_mode_setting(monkeypatch):
    from dilated_attn.kernels import backward
    from dilated_attn.kernels.backward import DQ_ENV, dq_mode

    q = torch.zeros(1, 4, 1, 16, dtype=torch.float16)
    monkeypatch.delenv(DQ_ENV, raising=False)
    assert dq_mode(q, q, q, q) == 0
    monkeypatch.setenv(DQ_ENV, "recompute")
    assert dq_mode(q, q, q, q) == 0
    monkeypatch.setenv(DQ_ENV, "atomic")
    # Element atomics only on the interpreter (to test the accumulation); elsewhere without bulk
    # reductions (here: no CUDA tensor) the dQ kernel runs.
    monkeypatch.setattr(backward, "interpreting", lambda: True)
    assert dq_mode(q, q, q, q) == 1
    monkeypatch.setattr(backward, "interpreting", lambda: False)
    assert dq_mode(q, q, q, q) == 0
    # Deterministic algorithms always get the dQ kernel (a fixed summation order).
    monkeypatch.setattr(backward, "interpreting", lambda: True)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert dq_mode(q, q, q, q) == 0
    monkeypatch.setenv(DQ_ENV, "fast")
    with pytest.raises(
        ValueError, match="DILATED_ATTN_TRITON_DQ='fast' must be one of 'auto', 'atomic', 'recompute'"
    ):
        dq_mode(q, q, q, q)


def test_tensor_descriptor_eligibility(monkeypatch):
    half = torch.empty(2, 8, 2, 64, dtype=torch.float16)
    monkeypatch.setenv(tuning.TMA_ENV, "1")
    assert tuning.use_tma(half, half, half)
    assert not tuning.use_tma(half.float(), half.float(), half.float())  # float32: pointer loads
    assert not tuning.use_tma(torch.empty(2, 8, 2, 24, dtype=torch.float16))  # 48-byte rows
    misaligned = torch.empty(2 * 8 * 2 * 64 + 1, dtype=torch.float16)[1:].view(2, 8, 2, 64)
    assert not tuning.use_tma(half, misaligned, half)
    monkeypatch.setenv(tuning.TMA_ENV, "auto")
    assert not tuning.use_tma(half, half, half)  # CPU tensors
    monkeypatch.setenv(tuning.TMA_ENV, "0")
    assert not tuning.use_tma(half, half, half)
    monkeypatch.setenv(tuning.TMA_ENV, "yes")
    with pytest.raises(ValueError, match=r"DILATED_ATTN_TRITON_TMA='yes' must be one of"):
        tuning.use_tma(half, half, half)


@interpreted
def test_interpreted_empty_rows_are_zero_with_zero_gradients():
    # r = 2 and 4 with n = 37: rows at odd offsets of head 0 have no keys at all.
    q, k, v = (torch.randn(1, 37, 2, 16, requires_grad=True) for _ in range(3))
    out, lse = triton_dilated_attention(q, k, v, [8, 16], [2, 4], return_lse=True)
    empty = torch.isneginf(lse)
    assert empty[0, 1::2, 0].all() and not empty[0, 0::2, 0].any()
    assert torch.all(out[empty] == 0)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.all(t.grad[empty] == 0)


@interpreted
def test_interpreted_non_contiguous_inputs():
    base = torch.randn(1, 3, 60, 2, 32)
    q, k, v = base.unbind(1)  # strided views
    out = triton_dilated_attention(q, k, v, [20, 60], [1, 3])
    ref = dilated_attention_reference(q, k, v, [20, 60], [1, 3])
    assert relative_error(out, ref) <= TOLERANCES[torch.float32][0]


@interpreted
def test_interpreted_opcheck():
    q, k, v = (torch.randn(1, 40, 2, 16, requires_grad=True) for _ in range(3))
    args = (q, k, v, [8, 40], [1, 2], "longnet", True, 0.25)
    torch.library.opcheck(torch.ops.dilated_attn.triton_fwd.default, args)
    out, lse = torch.ops.dilated_attn.triton_fwd(*args)
    dout = torch.randn_like(out)
    bwd_args = (
        dout,
        q.detach(),
        k.detach(),
        v.detach(),
        out.detach(),
        lse.detach(),
        None,
        [8, 40],
        [1, 2],
        "longnet",
        True,
        0.25,
    )
    torch.library.opcheck(torch.ops.dilated_attn.triton_bwd.default, bwd_args)


@interpreted
def test_interpreted_opcheck_grouped_kv_heads():
    # The fake implementations give dk, dv the shape of k, v (3 K/V heads for 6 query heads).
    q = torch.randn(1, 40, 6, 16, requires_grad=True)
    k, v = (torch.randn(1, 40, 3, 16, requires_grad=True) for _ in range(2))
    args = (q, k, v, [8, 40], [1, 3], "longnet", True, 0.25)
    torch.library.opcheck(torch.ops.dilated_attn.triton_fwd.default, args)
    out, lse = torch.ops.dilated_attn.triton_fwd(*args)
    dout = torch.randn_like(out)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None)
    bwd_args += ([8, 40], [1, 3], "longnet", True, 0.25)
    torch.library.opcheck(torch.ops.dilated_attn.triton_bwd.default, bwd_args)
    dq, dk, dv = torch.ops.dilated_attn.triton_bwd(*bwd_args)
    assert dq.shape == q.shape and dk.shape == dv.shape == k.shape


@interpreted
def test_interpreted_compile_fullgraph():
    def f(q, k, v):
        out, lse = triton_dilated_attention(q, k, v, [16, 48], [1, 2], causal=True, return_lse=True)
        return out.sum() + lse.sum()

    q, k, v = (torch.randn(1, 48, 2, 16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager_loss = f(q, k, v)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    torch.testing.assert_close(loss, eager_loss)
    for ours, theirs in zip(grads, eager_grads):
        torch.testing.assert_close(ours, theirs)


# -- argument errors ----------------------------------------------------------------------------


def test_triton_capabilities_match_the_kernels():
    """The backend module declares the kernels' limits without importing Triton; they agree."""
    assert DTYPES == op.DTYPES and HEAD_DIMS == (op.MIN_HEAD_DIM, op.MAX_HEAD_DIM)


def test_rejects_dropout():
    q = torch.randn(1, 16, 2, 16)
    with pytest.raises(ValueError, match=r"dropout_p=0.1 not supported \(it must be 0\)"):
        triton_dilated_attention(q, q, q, [8], [1], dropout_p=0.1)


@pytest.mark.parametrize("head_dim", [8, 272])
def test_rejects_head_dim_out_of_range(head_dim):
    q = torch.randn(1, 16, 2, head_dim)
    with pytest.raises(ValueError, match=rf"head_dim {head_dim} outside \[16, 256\]"):
        triton_dilated_attention(q, q, q, [8], [1])


def test_rejects_float64_and_unknown_kwargs():
    q = torch.randn(1, 16, 2, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype torch.float64 not in"):
        triton_dilated_attention(q, q, q, [8], [1])
    with pytest.raises(ValueError, match="key_padding_mask not supported"):
        triton_dilated_attention(
            q.float(), q.float(), q.float(), [8], [1], key_padding_mask=torch.zeros(1, 16, dtype=torch.bool)
        )
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        triton_dilated_attention(q.float(), q.float(), q.float(), [8], [1], block_size=3)


def test_rejects_cpu_tensors():
    q = torch.randn(1, 16, 2, 16)
    with pytest.raises(
        ValueError, match=r"backend='triton' cannot run these inputs: device 'cpu' not in \('cuda',\)"
    ):
        dilated_attention(q, q, q, [8], [1], backend="triton")


def test_rejects_bad_pattern_and_mode():
    q = torch.randn(1, 16, 2, 16, device="cuda" if HAS_CUDA else "cpu")
    with pytest.raises(ValueError, match=r"dilation_rates\[0\]=16 must be <= segment_lengths\[0\]=8"):
        triton_dilated_attention(q, q, q, [8], [16])
    with pytest.raises(ValueError, match="mode='dense'"):
        triton_dilated_attention(q, q, q, [8], [1], mode="dense")


def test_registers_preferred_cuda_backend():
    seen = {}
    register_triton(lambda name, fn, **caps: seen.update(name=name, fn=fn, caps=caps))
    assert seen["name"] == "triton" and seen["fn"] is triton_backend
    caps = seen["caps"]
    assert caps["devices"] == ("cuda",) and caps["priority"] == 20
    backend = get_registry().attention("triton")
    assert set(backend.capabilities.modes) == {"longnet", "head_groups"}
    assert backend.capabilities.causal and backend.capabilities.backward
    assert caps["gqa"] and backend.capabilities.gqa  # grouped K/V heads reach the kernels unrepeated
    assert backend.capabilities.priority > get_registry().attention("sdpa").capabilities.priority


# -- the conformance kit ------------------------------------------------------------------------


@interpreted
class TestInterpretedConformance(BackendConformance):
    backend = "triton-interpreted"
    device = "cpu"
    dtypes = (torch.float32, torch.float16)


@cuda
class TestCudaConformance(BackendConformance):
    backend = "triton"
    device = "cuda"
    dtypes = (torch.bfloat16, torch.float16, torch.float32)


# -- GPU, medium sizes --------------------------------------------------------------------------

CUDA_CASES = [
    ((2, 1000, 6, 64), [128, 256, 512, 2048], [1, 2, 4, 3], "longnet"),
    ((1, 4099, 4, 64), [512, 1024, 2048, 4096], [1, 2, 4, 8], "longnet"),
    ((1, 2050, 5, 128), [256, 1024, 2050], [2, 3, 5], "longnet"),
    ((1, 1537, 3, 32), [512, 1537], [1, 4], "head_groups"),
    ((1, 1111, 2, 256), [300, 1111], [1, 7], "longnet"),
    ((1, 999, 2, 80), [333, 999], [1, 3], "longnet"),
]


@cuda
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
@pytest.mark.parametrize("shape, w, r, mode", CUDA_CASES)
def test_cuda_matches_oracle(shape, w, r, mode, dtype, causal):
    _check(shape, w, r, mode=mode, causal=causal, dtype=dtype, device="cuda")


@cuda
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cuda_grouped_kv_heads_match_oracle(causal):
    # 16 query heads over 4 K/V heads (g = 4): r = 1, 2, 4 divide g, r = 8 gives each head its own rows.
    _check(
        (1, 4099, 16, 64),
        [512, 1024, 2048, 4096],
        [1, 2, 4, 8],
        mode="longnet",
        causal=causal,
        dtype=torch.bfloat16,
        device="cuda",
        kv_heads=4,
    )


@cuda
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_odd_lengths_and_grouped_d128_match_oracle(causal, dtype):
    # r = 3 does not divide 1000; n odd; d = 128 and grouped K/V in the second call.
    _check(
        (2, 3001, 4, 64),
        [200, 1000, 3001],
        [1, 3, 4],
        mode="longnet",
        causal=causal,
        dtype=dtype,
        device="cuda",
    )
    _check(
        (1, 2049, 8, 128),
        [256, 2049],
        [1, 2],
        mode="head_groups",
        causal=causal,
        dtype=dtype,
        device="cuda",
        kv_heads=2,
    )


@cuda
@pytest.mark.parametrize("strategy", ["auto", "recompute", "atomic"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_dq_strategies_match_oracle(strategy, causal, dtype, monkeypatch):
    from dilated_attn.kernels.backward import DQ_ENV

    monkeypatch.setenv(DQ_ENV, strategy)
    if strategy == "atomic":
        from dilated_attn.kernels import backward

        monkeypatch.setattr(backward, "_dq_tuned", [])  # dQ comes from the dK/dV kernel alone
    # Five dQ accumulator chunks (segments up to 1024 in 4099 tokens), r = 3 not dividing 512.
    _check(
        (2, 4099, 4, 64),
        [256, 512, 1024],
        [1, 3, 4],
        mode="longnet",
        causal=causal,
        dtype=dtype,
        device="cuda",
    )
    _check(
        (1, 2049, 8, 128),
        [256, 1024],
        [1, 2],
        mode="head_groups",
        causal=causal,
        dtype=dtype,
        device="cuda",
        kv_heads=2,
    )
    _check((1, 1537, 4, 32), [512, 1537], [2, 4], mode="longnet", causal=causal, dtype=dtype, device="cuda")


@cuda
@pytest.mark.parametrize("how", ["deterministic algorithms", "recompute"])
def test_cuda_backward_is_bitwise_deterministic(how, monkeypatch):
    from dilated_attn.kernels.backward import DQ_ENV

    # Deterministic algorithms override a request for dQ reductions.
    monkeypatch.setenv(DQ_ENV, "recompute" if how == "recompute" else "atomic")
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, 8191, 8, 64, generator=g).cuda().bfloat16() for _ in range(4))
    grads = []
    was = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(how == "deterministic algorithms", warn_only=True)
    try:
        for _ in range(3):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = triton_dilated_attention(*leaves, [512, 2048, 8191], [1, 2, 4], causal=True)
            grads.append(torch.autograd.grad(out, leaves, dout))
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn_only)
    for again in grads[1:]:
        for a, b in zip(grads[0], again):
            assert torch.equal(a, b)


@cuda
@pytest.mark.parametrize(
    "dtype, d, config",
    [
        (torch.bfloat16, 64, (128, 64, 8, 4)),
        (torch.bfloat16, 64, (128, 64, 4, 3)),
        (torch.float32, 64, (64, 32, 8, 2)),
        (torch.bfloat16, 256, (128, 32, 8, 2)),
        (torch.float32, 256, (32, 16, 8, 1)),
    ],
    ids=[
        "bf16-d64-128x64w8",
        "bf16-d64-128x64w4",
        "fp32-d64-64x32w8",
        "bf16-d256-128x32w8",
        "fp32-d256-32x16w8",
    ],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cuda_forward_merge_is_right_every_run(dtype, d, config, causal):
    """The forward's merging epilogue reads a row's LSE and stores the merged one in place, like the
    engine's merge (test_segments.py): on tiles whose row vectors may span warps, every one of many
    runs equals a float64 merge of the same launch written alone, rows it does not select are left as
    they were, and the runs are bitwise equal."""
    import dataclasses

    from dilated_attn.kernels.forward import forward_launch

    n, h, w, r = (1 << 18 if d == 64 else 1 << 16), 8, 4096, 2
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, out0 = (torch.randn(1, n, h, d, device="cuda", generator=g).to(dtype) for _ in range(4))
    launch = plan_launches(n, h, [w], [r], "longnet").launches[0]
    scale = d**-0.5
    part = torch.full_like(out0, float("nan"))
    part_lse = torch.full((1, n, h), float("nan"), device="cuda")
    forward_launch(q, k, v, part, part_lse, launch, causal=causal, scale=scale, variant={"config": config})
    chosen = ~torch.isnan(part_lse)
    assert int(chosen.sum()) == n * h // r  # each head's offset class: every r-th row
    # Earlier rows' LSEs near the launch's own, so that both sides of every merge carry weight.
    noise = torch.randn(1, n, h, device="cuda", generator=g)
    lse0 = torch.where(chosen, part_lse + noise, noise)
    new = torch.logaddexp(lse0.double(), part_lse.double())
    want = (
        out0.double() * torch.exp(lse0 - new)[..., None]
        + part.double() * torch.exp(part_lse - new)[..., None]
    )
    want = torch.where(chosen[..., None], want, out0.double())
    new = torch.where(chosen, new, lse0.double())
    bound = (2**-7 if dtype == torch.bfloat16 else 1e-5) * want.abs().max()
    merging = dataclasses.replace(launch, accumulate=True)
    first = None
    for _ in range(8):
        out, lse = out0.clone(), lse0.clone()
        forward_launch(q, k, v, out, lse, merging, causal=causal, scale=scale, variant={"config": config})
        assert (out.double() - want).abs().max() <= bound
        assert (lse.double() - new).abs().max() <= 1e-5
        assert torch.equal(out[~chosen], out0[~chosen]) and torch.equal(lse[~chosen], lse0[~chosen])
        if first is None:
            first = out, lse
        assert torch.equal(out, first[0]) and torch.equal(lse, first[1])


@cuda
def test_cuda_auto_prefers_triton():
    q = torch.randn(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16)
    out = dilated_attention(q, q, q, [64, 256], [1, 4])
    torch.testing.assert_close(out, triton_dilated_attention(q, q, q, [64, 256], [1, 4]), rtol=0, atol=0)
    assert get_registry().select(build_request(q, q, q, causal=True)).name == "triton"
    q8 = torch.randn(1, 256, 2, 8, device="cuda", dtype=torch.bfloat16)
    assert get_registry().select(build_request(q8, q8, q8)).name == "sdpa"


@cuda
def test_cuda_compile_fullgraph():
    def f(q, k, v):
        return triton_dilated_attention(q, k, v, [256, 1024], [1, 4], causal=True)

    q, k, v = (
        torch.randn(1, 1024, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    out = torch.compile(f, fullgraph=True)(q, k, v)
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = f(q, k, v)
    ref.float().square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for ours, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(ours, t.grad, rtol=0, atol=0)


@cuda
def test_cuda_graph_capture():
    q, k, v = (torch.randn(1, 2048, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w, r = [512, 2048], [1, 4]
    expected = triton_dilated_attention(q, k, v, w, r)  # also autotunes, which must not happen in capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        triton_dilated_attention(q, k, v, w, r)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = triton_dilated_attention(q, k, v, w, r)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(captured, triton_dilated_attention(q, k, v, w, r), rtol=0, atol=0)
    assert not torch.equal(captured, expected)


@cuda
def test_cuda_forward_peak_memory_within_output_budget():
    shape = (1, 1 << 16, 16, 64)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    w, r = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
    with torch.no_grad():
        triton_dilated_attention(q, k, v, w, r)  # autotune outside the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = triton_dilated_attention(q, k, v, w, r)
        torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= 1.5 * out.numel() * out.element_size()
