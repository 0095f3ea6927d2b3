"""``torch.compile(fullgraph=True)`` of the front door and the module, equal to eager (CPU here)."""

from __future__ import annotations

import pytest
import torch
from dilated_attn import MultiheadDilatedAttention, dilated_attention
from dilated_attn.registry import get_registry


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("causal", [False, True])
def test_compiled_function_equals_eager_forward_and_backward(causal):
    get_registry()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 4, 16, generator=g, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return dilated_attention(q, k, v, [8, 16], [1, 2], causal=causal, return_lse=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, lse = compiled(q, k, v)
    ref_out, ref_lse = f(q, k, v)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    grads = torch.autograd.grad((out.sum() + lse.sum()), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out.sum() + ref_lse.sum()), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compiled_module_equals_eager():
    torch.manual_seed(0)
    mha = MultiheadDilatedAttention(32, 4, [8, 16], [1, 2], num_kv_heads=2, causal=True)
    x = torch.randn(2, 24, 32)
    compiled = torch.compile(mha, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x)[0], mha(x)[0], rtol=1e-6, atol=1e-6)


def test_compiled_with_inductor_equals_eager():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 33, 2, 16, generator=g) for _ in range(3))

    def f(q, k, v):
        return dilated_attention(q, k, v, [8, 16], [1, 2], causal=True) * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_on_cuda_equals_eager(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1031, 8, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return dilated_attention(q, k, v, [128, 512], [1, 4], causal=True, return_lse=True)

    out, lse = torch.compile(f, fullgraph=True)(q, k, v)
    ref_out, ref_lse = f(q, k, v)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    mha = MultiheadDilatedAttention(256, 8, [128, 512], [1, 4], num_kv_heads=2, causal=True, device="cuda")
    x = torch.randn(2, 700, 256, device="cuda")
    torch.testing.assert_close(torch.compile(mha, fullgraph=True)(x)[0], mha(x)[0], rtol=1e-5, atol=1e-5)
