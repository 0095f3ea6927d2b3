"""Probe: the Triton row copy and row zeroing against torch's copies and memsets, one process; engine
against Triton forwards for head_groups. Ran at b5eac33 (``forward_prefers_triton`` still existed)."""

import contextlib
import functools
import json
import os
import statistics

import torch
import torch.nn.functional as F
from dilated_attn import dilated_attention
from dilated_attn.kernels import backward as BW
from dilated_attn.kernels import forward as FW
from dilated_attn.kernels import segments as S
from torch.nn.attention import SDPBackend, sdpa_kernel

OUT = os.environ["OUT"]
res = {}


def log(k, v):
    res[k] = v
    print(k, v, flush=True)
    json.dump(res, open(f"{OUT}/probe2.json", "w"), indent=1, default=str)


SEG = [2048, 4096, 8192, 16384, 32768]
DIL = [1, 2, 4, 8, 16]


def timeit(fn, warm=2, rep=7):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rep):
        a = torch.cuda.Event(True)
        b = torch.cuda.Event(True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return round(statistics.median(ts), 3)


def old_scatter(targets, sources, acc):
    for t, s, a in zip(targets, sources, acc):
        t.add_(s) if a else t.copy_(s)


def old_start(tensors, launches, *, stats=None):
    for t in tensors:
        t.zero_()
    if stats is not None:
        stats.fill_(float("-inf"))


@contextlib.contextmanager
def variant(name):
    saved = (S.scatter_into, FW.start_zeroed, BW.start_zeroed, FW.forward_prefers_triton)
    if name.startswith("old"):
        S.scatter_into = old_scatter
        FW.start_zeroed = old_start
        BW.start_zeroed = old_start
    if name.endswith("engine_fwd"):
        FW.forward_prefers_triton = lambda *a: False
    try:
        yield
    finally:
        S.scatter_into, FW.start_zeroed, BW.start_zeroed, FW.forward_prefers_triton = saved


def inputs(n, h, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = [torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)]
    for x in t[:3]:
        x.requires_grad_()
    return t


def ceiling(n, h, d, causal, grad):
    segs = n // 2048
    L = [torch.randn(segs, 2048, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    for x in L[:3]:
        x.requires_grad_(grad)
    q, k, v, do = (x.transpose(1, 2) for x in L)

    def att():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    if grad:
        return timeit(lambda: torch.autograd.grad(att(), L[:3], do))
    with torch.no_grad():
        return timeit(att)


ROWS = [
    ("exact", "longnet", False, 16, 64, 1),
    ("exact causal", "longnet", True, 16, 64, 1),
    ("hg", "head_groups", False, 16, 64, 1),
    ("hg causal", "head_groups", True, 16, 64, 1),
    ("d128", "longnet", False, 8, 128, 1),
    ("hg d128", "head_groups", False, 8, 128, 1),
    ("n/4", "longnet", False, 16, 64, 4),
    ("hg n/4", "head_groups", False, 16, 64, 4),
]


# correctness: new vs old bitwise
def grads(f, leaves, do):
    return torch.autograd.grad(f(), leaves, do)


for label, mode, causal, h, d, _ in ROWS[:4]:
    q, k, v, do = inputs((1 << 20) // 4, h, d)
    outs = {}
    for var in ("old", "new", "new_engine_fwd"):
        with variant(var):
            o = dilated_attention(q, k, v, SEG, DIL, mode=mode, causal=causal, backend="triton")
            outs[var] = (o.detach(), *torch.autograd.grad(o, (q, k, v), do))
    log(f"bitwise_new_vs_old {label}", [torch.equal(a, b) for a, b in zip(outs["new"], outs["old"])])
    log(
        f"maxdiff_enginefwd_vs_new {label}",
        [float((a.float() - b.float()).abs().max()) for a, b in zip(outs["new_engine_fwd"], outs["new"])],
    )
    del q, k, v, do, outs

for label, mode, causal, h, d, div in ROWS:
    n = (1 << 20) // div
    q, k, v, do = inputs(n, h, d)
    row = {"ceil_f": ceiling(n, h, d, causal, False), "ceil_fb": ceiling(n, h, d, causal, True)}
    for var in ("old", "new") + (("old_engine_fwd", "new_engine_fwd") if mode == "head_groups" else ()):
        with variant(var):
            f = functools.partial(
                dilated_attention, q, k, v, SEG, DIL, mode=mode, causal=causal, backend="triton"
            )
            with torch.no_grad():
                row[f"{var}_f"] = timeit(f)
            row[f"{var}_fb"] = timeit(functools.partial(grads, f, (q, k, v), do))
    log(label, row)
    del q, k, v, do
