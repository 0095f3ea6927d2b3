# Ran at 162ebea (the kernels of this folder's other runs) on one H200, 2026-12-01 04:10-04:15 UTC:
#   python3 forward_launches_probe.py  (OUT: a folder for its JSON)
"""Probe: per launch of the longnet-1m forward, the engine (cuDNN + merge) against the Triton kernel with
its merging epilogue (untuned tiles); cuDNN's whole r=1 call with and without the LSE."""

import json
import os
import statistics
from functools import partial

import torch
from dilated_attn.kernels import forward as FW
from dilated_attn.kernels import segments as S
from dilated_attn.kernels.launches import plan_launches

OUT = os.environ["OUT"]
res = {}


def log(k, v):
    res[k] = v
    print(k, v, flush=True)
    json.dump(res, open(f"{OUT}/probe13.json", "w"), indent=1, default=str)


def ev(fn, reps=7):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(True)
        b = torch.cuda.Event(True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return round(statistics.median(ts), 3)


SEG = [2048, 4096, 8192, 16384, 32768]
DIL = [1, 2, 4, 8, 16]
n, h, d = 1 << 20, 16, 64
scale = d**-0.5
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
plan = plan_launches(n, h, SEG, DIL, "longnet")
for causal in (False, True):
    out, lse = FW.forward(q, k, v, plan, causal=causal, scale=scale)
    rows = []
    tot = {"engine": 0.0}
    configs = [(128, 64, 8, 4), (128, 128, 8, 3), (128, 64, 4, 3)]
    for c in configs:
        tot[str(c)] = 0.0
    for launch in plan.launches[1:]:
        o, l = out.clone(), lse.clone()
        row = {
            "r": launch.dilation,
            "head0": launch.head0,
            "heads": launch.num_heads,
            "engine": ev(partial(S.forward_launch, q, k, v, o, l, launch, causal=causal, scale=scale)),
        }
        tot["engine"] += row["engine"]
        for c in configs:
            o, l = out.clone(), lse.clone()
            try:
                row[str(c)] = ev(
                    partial(
                        FW.forward_launch,
                        q,
                        k,
                        v,
                        o,
                        l,
                        launch,
                        causal=causal,
                        scale=scale,
                        variant={"config": c, "USE_TMA": True},
                    )
                )
            except Exception as e:
                row[str(c)] = f"{type(e).__name__}: {str(e)[:80]}"
            if isinstance(row[str(c)], float):
                tot[str(c)] += row[str(c)]
        rows.append(row)
    log(f"causal={causal} per launch ms", rows)
    log(f"causal={causal} totals over launches 2..", {k_: round(v_, 3) for k_, v_ in tot.items()})
    # whole r=1 call with and without LSE
    qv, kv, vv = (t.view(n // 2048, 2048, h, d).transpose(1, 2) for t in (q, k, v))
    for lse_flag in (True, False):
        log(
            f"causal={causal} cudnn whole r=1 lse={lse_flag} ms",
            ev(
                partial(
                    torch.ops.aten._scaled_dot_product_cudnn_attention,
                    qv,
                    kv,
                    vv,
                    None,
                    lse_flag,
                    0.0,
                    causal,
                    False,
                    scale=scale,
                )
            ),
        )
    del out, lse
