"""Every block shape the gather produces runs on some kernel: the routing rule, and tiny blocks on CUDA.

The rule (``block_attention.choose_kernel``) is a pure function of the block's shape, dtype and
device, checked here over tiny shapes on the CPU. The CUDA test runs the shapes that once crashed
cuDNN (a one-row block: n=4099, w=[2048, 4096, 8192], r=[1, 2, 4], causal, bf16) and their
neighbours forward and backward against the oracle; it skips without a GPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from dilated_attn import dilated_attention
from dilated_attn.block_attention import CUDA_GRID_LIMIT, KERNELS, choose_kernel
from dilated_attn.reference import dilated_attention_reference
from dilated_attn.testing import TOLERANCES, relative_error

LOW = (torch.float16, torch.bfloat16)
ALL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@pytest.mark.parametrize("prefer", ["auto", "cudnn", "flash", "math"])
def test_rule_covers_every_tiny_shape(prefer):
    for m_q, m_k, d, dtype in itertools.product(range(1, 5), range(1, 5), (4, 8, 16, 64, 136, 256, 264), ALL):
        for device in ("cpu", "cuda"):
            kernel = choose_kernel(m_q, m_k, d, dtype, device, prefer=prefer)
            assert kernel in KERNELS
            if device == "cpu":
                assert kernel == ("math" if dtype == torch.float16 else "cpu_flash")
                continue
            fused = dtype in LOW and d % 8 == 0 and d <= 256 and prefer != "math"
            if not fused:
                assert kernel == "math", (m_q, m_k, d, dtype)
            elif m_q == 1 or m_k == 1 or d > 128 or prefer == "flash":
                # cuDNN refuses one-row blocks (s_q = s_kv = 1, s_kv = 1) and head dims above 128.
                assert kernel == "flash", (m_q, m_k, d, dtype)
            else:
                assert kernel == "cudnn", (m_q, m_k, d, dtype)


def test_rule_sends_what_fused_kernels_cannot_take_to_math():
    for device in ("cpu", "cuda"):
        for dtype in ALL:
            assert choose_kernel(4, 4, 16, dtype, device, plain=False) == "math"
            assert choose_kernel(4, 4, 16, dtype, device, finite=False) == "math"
            assert choose_kernel(0, 4, 16, dtype, device) == "math"
    assert choose_kernel(4, 4, 16, torch.bfloat16, "cuda", cudnn=False) == "flash"
    assert choose_kernel(4, 4, 16, torch.bfloat16, "cuda", heads=CUDA_GRID_LIMIT + 1) == "math"
    assert choose_kernel(4, 4, 16, torch.bfloat16, "cuda", heads=CUDA_GRID_LIMIT) == "cudnn"
    assert choose_kernel(4, 4, 16, torch.float32, "meta") == "math"
    with pytest.raises(ValueError, match="DILATED_ATTN_CUDA_KERNEL='fast' must be one of"):
        choose_kernel(4, 4, 16, torch.bfloat16, "cuda", prefer="fast")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_one_row_blocks_on_cpu(n, dtype, causal):
    """Patterns whose last segments hold one row per head, through the CPU flash kernel."""
    _check("cpu", n, [2, 4, 8], [1, 2, 4], dtype, causal, padded=False)


def _check(device, n, w, r, dtype, causal, padded, backend="sdpa"):
    g = torch.Generator().manual_seed(n * 31 + len(w))
    shape = (2, n, 4, 64)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    mask = (torch.rand(2, n, generator=g) < 0.1).to(device) if padded else None
    out, lse = dilated_attention(
        q, k, v, w, r, causal=causal, key_padding_mask=mask, return_lse=True, backend=backend
    )
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = dilated_attention_reference(
        q64, k64, v64, w, r, causal=causal, key_padding_mask=mask, return_lse=True
    )
    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert relative_error(out, ref) <= fwd_tol
    assert relative_error(lse, ref_lse) <= fwd_tol
    grad = torch.randn(shape, generator=g).to(device)
    (out * grad.to(dtype)).sum().backward()
    (ref * grad.double()).sum().backward()
    for name, ours, theirs in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        err = relative_error(ours.grad, theirs.grad)
        assert err <= grad_tol, f"d{name} relative error {err:.3e} > {grad_tol:g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", ["auto", "cudnn", "flash"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 4099])
def test_tiny_blocks_on_cuda(n, dtype, causal, padded, kernel, monkeypatch):
    monkeypatch.setenv("DILATED_ATTN_CUDA_KERNEL", kernel)
    _check("cuda", n, [2048, 4096, 8192], [1, 2, 4], dtype, causal, padded)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_batches_beyond_the_grid_are_split(kernel, monkeypatch):
    """A gathered batch larger than the grid's 65535 runs in several launches (here the limit is 3)."""
    monkeypatch.setattr("dilated_attn.block_attention.CUDA_GRID_LIMIT", 3)
    monkeypatch.setenv("DILATED_ATTN_CUDA_KERNEL", kernel)
    _check("cuda", 70, [8, 16], [1, 2], torch.bfloat16, True, padded=False)
