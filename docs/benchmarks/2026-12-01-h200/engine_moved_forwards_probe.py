# Ran at 162ebea (before the engine's head-size rule) on one H200, 2026-12-01 04:38-04:45 UTC:
#   python3 engine_moved_forwards_probe.py  (OUT: a folder for its JSON)
# ruff: noqa: B023, F821  (each closure is called in the loop iteration that made it; the loop deletes its tensors)
"""Probe: forwards that took the Triton kernel before cf22b32 (one r > 1 pattern; r = 1 with a short last
segment; d <= 64) on the segment engine against the Triton kernel, one process, interleaved."""

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
    json.dump(res, open(f"{OUT}/probe14.json", "w"), indent=1, default=str)


def ev(fn):
    a = torch.cuda.Event(True)
    b = torch.cuda.Event(True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


cases = [
    ("one pattern w=4096 r=2", 1 << 20, 16, 64, [4096], [2], "longnet"),
    ("one pattern w=32768 r=16", 1 << 20, 16, 64, [32768], [16], "longnet"),
    ("r=1 w=2048, short last segment", 1_000_000, 16, 64, [2048], [1], "longnet"),
    ("w=2048,8192 r=1,4, short last segment", 1_000_000, 16, 64, [2048, 8192], [1, 4], "longnet"),
    ("one pattern w=4096 r=2, d=32", 1 << 20, 16, 32, [4096], [2], "longnet"),
    (
        "head_groups longnet-256k",
        1 << 18,
        16,
        64,
        [2048, 4096, 8192, 16384, 32768],
        [1, 2, 4, 8, 16],
        "head_groups",
    ),
]
for name, n, h, d, w, r, mode in cases:
    for causal in (False, True):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (
            torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)
        )
        times = {"auto": [], "triton": []}
        outs = {}
        for setting in times:
            os.environ[ENGINE_ENV] = setting
            with torch.no_grad():
                outs[setting] = dilated_attention(q, k, v, w, r, mode=mode, causal=causal, backend="triton")
                dilated_attention(q, k, v, w, r, mode=mode, causal=causal, backend="triton")
        for _ in range(9):
            for setting in times:
                os.environ[ENGINE_ENV] = setting
                with torch.no_grad():
                    times[setting].append(
                        ev(
                            lambda: dilated_attention(
                                q, k, v, w, r, mode=mode, causal=causal, backend="triton"
                            )
                        )
                    )
        diff = (outs["auto"].float() - outs["triton"].float()).abs().max().item()
        log(
            f"{name}{' causal' if causal else ''}",
            {s: round(statistics.median(t), 3) for s, t in times.items()} | {"max_abs_diff": diff},
        )
        del q, k, v, outs
        torch.cuda.empty_cache()
os.environ[ENGINE_ENV] = "auto"
