# Ran at 162ebea (before the engine's head-size rule) on one H200, 2026-12-01 04:38-04:45 UTC:
#   python3 engine_head_sizes_probe.py  (OUT: a folder for its JSON)
# ruff: noqa: B023, F821  (each closure is called in the loop iteration that made it; the loop deletes its tensors)
"""Probe: the segment engine against the Triton kernels at small head sizes, forward and forward+backward."""

import json
import os
import statistics

import torch
from dilated_attn import dilated_attention
from dilated_attn.kernels.segments import ENGINE_ENV

OUT = os.environ["OUT"]
res = {}


def log(k, v):
    res[k] = v
    print(k, v, flush=True)
    json.dump(res, open(f"{OUT}/probe15.json", "w"), indent=1, default=str)


def ev(fn):
    a = torch.cuda.Event(True)
    b = torch.cuda.Event(True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


W, R = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
n, h = 1 << 19, 16
for d in (32, 16, 48, 64):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (
        torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)
    )
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def fwd():
        with torch.no_grad():
            return dilated_attention(q, k, v, W, R, backend="triton")

    def fwdbwd():
        return torch.autograd.grad(dilated_attention(*leaves, W, R, backend="triton"), leaves, do)

    for name, fn in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
        times = {"auto": [], "triton": []}
        for s in times:
            os.environ[ENGINE_ENV] = s
            fn()
            fn()
        for _ in range(5):
            for s in times:
                os.environ[ENGINE_ENV] = s
                times[s].append(ev(fn))
        log(f"d={d} {name} n={n}", {s: round(statistics.median(t), 3) for s, t in times.items()})
os.environ[ENGINE_ENV] = "auto"
