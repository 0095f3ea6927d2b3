"""The Triton decode step against the float64 oracle's causal forward.

Without CUDA the kernels run on Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before they are
imported) at small sizes, in float32 and float16 (the interpreter mishandles bfloat16 tiles; see
test_triton_kernel.py). On a GPU the same checks run on CUDA, plus a CUDA-graph replay.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from dilated_attn.decoding import dilated_attention_with_kvcache  # noqa: E402
from dilated_attn.kernels import tuning  # noqa: E402
from dilated_attn.kernels.decode import decode_step  # noqa: E402
from dilated_attn.kvcache import DilatedKVCache  # noqa: E402
from dilated_attn.reference import dilated_attention_reference  # noqa: E402
from dilated_attn.testing import TOLERANCES, relative_error  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
runs = pytest.mark.skipif(
    not (HAS_CUDA or tuning.interpreting()),
    reason="needs CUDA or the kernels imported under TRITON_INTERPRET=1",
)

PATTERNS = [
    ([4, 8], [1, 2]),
    ([5, 7], [2, 3]),
    ([3, 6, 12], [1, 2, 4]),
    ([6, 9], [4, 2]),
    ([8, 40], [1, 4]),
]


def _inputs(b, n, h, h_kv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, n, h, d), (b, n, h_kv, d), (b, n, h_kv, d))
    return [torch.randn(s, generator=g).to(device=DEVICE, dtype=dtype) for s in shapes]


def _oracle(q, k, v, w, r, mode):
    group = q.shape[2] // k.shape[2]
    k_rep, v_rep = (x.double().repeat_interleave(group, dim=2) for x in (k, v))
    return dilated_attention_reference(
        q.double(), k_rep, v_rep, w, r, mode=mode, causal=True, return_lse=True
    )


def _poison(cache):
    for i in range(cache.batch_size):
        cache.storage(i).fill_(float("nan"))
    return cache


def _step(q, k, v, cache):
    """One kernel step, on CPU through the interpreter (the front door takes the torch path there)."""
    if HAS_CUDA:
        return dilated_attention_with_kvcache(q, k, v, cache, return_lse=True)
    out, lse = decode_step(q, k, v, cache, q.shape[-1] ** -0.5)
    cache._advance(1)
    return out, lse


def _decode(q, k, v, cache, prefill):
    """A chunked prefill of ``prefill`` tokens (the torch path), then kernel steps one token at a time."""
    out, lse = dilated_attention_with_kvcache(
        q[:, :prefill], k[:, :prefill], v[:, :prefill], cache, return_lse=True
    )
    outs, lses = [out], [lse.float()]
    for p in range(prefill, q.shape[1]):
        out, lse = _step(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], cache)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 1)


CASES = [(w, r, mode, torch.float32) for w, r in PATTERNS for mode in ("longnet", "head_groups")]
CASES += [(*PATTERNS[1], "longnet", torch.float16), (*PATTERNS[4], "head_groups", torch.float16)]


@runs
@pytest.mark.parametrize("w,r,mode,dtype", CASES)
def test_decode_kernel_matches_causal_oracle(w, r, mode, dtype):
    # Under the interpreter every program is Python: few heads, a short sequence.
    b, n, h, h_kv, d = (2, 29, 6, 3, 12) if HAS_CUDA else (2, 19, 4, 2, 12)
    q, k, v = _inputs(b, n, h, h_kv, d, dtype, seed=7 * len(w) + r[-1])
    ref, ref_lse = _oracle(q, k, v, w, r, mode)
    cache = DilatedKVCache(
        w,
        r,
        batch_size=b,
        num_heads=h_kv,
        num_query_heads=h,
        head_dim=d,
        dtype=dtype,
        device=DEVICE,
        mode=mode,
    )
    out, lse = _decode(q, k, v, _poison(cache), prefill=5)
    tol = TOLERANCES[dtype][0]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert relative_error(out, ref) <= tol
    assert relative_error(lse, ref_lse) <= tol
    assert torch.all(out[torch.isneginf(ref_lse)] == 0)
    assert cache.lengths.tolist() == [n] * b


@runs
@pytest.mark.parametrize("mode", ["longnet", "head_groups"])
def test_decode_kernel_batch_of_different_lengths(mode):
    w, r = [5, 11], [1, 3]
    b, n, h, d = 3, 20, 2, 16
    q, k, v = _inputs(b, n, h, h, d, torch.float32, seed=2)
    cache = _poison(
        DilatedKVCache(
            w, r, batch_size=b, num_heads=h, head_dim=d, dtype=torch.float32, device=DEVICE, mode=mode
        )
    )
    restart = 8
    first, _ = _decode(q[:, :restart], k[:, :restart], v[:, :restart], cache, prefill=2)
    cache.reset(2)
    outs = [first]
    for p in range(restart, n):
        out, _ = _step(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], cache)
        outs.append(out)
    out = torch.cat(outs, 1)
    tol = TOLERANCES[torch.float32][0]
    for i in (0, 1):
        ref, _ = _oracle(q[i : i + 1], k[i : i + 1], v[i : i + 1], w, r, mode)
        assert relative_error(out[i : i + 1], ref) <= tol
    ref2, _ = _oracle(q[2:, restart:], k[2:, restart:], v[2:, restart:], w, r, mode)
    assert relative_error(out[2:, restart:], ref2) <= tol


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_step_replays_in_a_cuda_graph(dtype):
    w, r = [16, 32, 64], [1, 2, 4]
    b, n, h, d = 2, 150, 8, 64
    q, k, v = _inputs(b, n, h, 2, d, dtype, seed=4)
    ref, _ = _oracle(q, k, v, w, r, "longnet")
    cache = DilatedKVCache(
        w, r, batch_size=b, num_heads=2, num_query_heads=h, head_dim=d, dtype=dtype, device="cuda"
    )
    prefill = 40
    dilated_attention_with_kvcache(q[:, :prefill], k[:, :prefill], v[:, :prefill], cache)
    static = [x[:, prefill : prefill + 1].clone() for x in (q, k, v)]
    # Warm up (compiles) on a side stream; the lengths are set back before the replays.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_step(*static, cache, d**-0.5)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static, _ = decode_step(*static, cache, d**-0.5)
    cache.lengths.fill_(prefill)
    outs = []
    for p in range(prefill, n):
        for buf, src in zip(static, (q, k, v)):
            buf.copy_(src[:, p : p + 1])
        graph.replay()
        outs.append(out_static.clone())
    assert cache.lengths.tolist() == [n] * b
    assert relative_error(torch.cat(outs, 1), ref[:, prefill:]) <= TOLERANCES[dtype][0]
