"""The portable path on CUDA (flash and cuDNN block kernels) against the oracle; skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from dilated_attn import dilated_attention
from dilated_attn.block_attention import CUDA_KERNEL_ENV
from dilated_attn.reference import dilated_attention_reference
from dilated_attn.testing import TOLERANCES, relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kernel", ["flash", "cudnn", "math"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["longnet", "head_groups"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_matches_oracle(kernel, dtype, mode, causal, monkeypatch):
    monkeypatch.setenv(CUDA_KERNEL_ENV, kernel)
    torch.manual_seed(0)
    shape = (2, 1000, 6, 64)
    w, r = [128, 256, 512, 2048], [1, 2, 4, 3]
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    out, lse = dilated_attention(q, k, v, w, r, mode=mode, causal=causal, return_lse=True, backend="sdpa")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = dilated_attention_reference(q64, k64, v64, w, r, mode=mode, causal=causal, return_lse=True)
    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert relative_error(out, ref) <= fwd_tol
    assert relative_error(lse, ref_lse) <= fwd_tol
    grad = torch.randn_like(ref)
    (out * grad.to(dtype)).sum().backward()
    (ref * grad).sum().backward()
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        assert relative_error(ours.grad, theirs.grad) <= grad_tol
