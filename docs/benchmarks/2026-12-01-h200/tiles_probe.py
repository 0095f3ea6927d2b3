"""Probe: merge and row-copy tiles; head_groups forwards on the engine or the Triton kernel. Ran at
9bcfe86 with cf22b32's tile constants, while ``forward_prefers_triton`` still existed."""

import functools
import json
import os
import statistics

import torch
from dilated_attn import dilated_attention
from dilated_attn.kernels import forward as FW
from dilated_attn.kernels import rows as R
from dilated_attn.kernels import segments as S
from dilated_attn.kernels.launches import plan_launches

OUT = os.environ["OUT"]
res = {}


def log(k, v):
    res[k] = v
    print(k, v, flush=True)
    json.dump(res, open(f"{OUT}/probe10.json", "w"), indent=1, default=str)


def ev(fn):
    a = torch.cuda.Event(True)
    b = torch.cuda.Event(True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


SEG = [2048, 4096, 8192, 16384, 32768]
DIL = [1, 2, 4, 8, 16]
n, h = 1 << 20, 16
for d in (64, 128):
    hh = 16 if d == 64 else 8
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v, out0 = (
        torch.randn(1, n, hh, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)
    )
    lse0 = torch.randn(1, n, hh, device="cuda", generator=g)
    plan = plan_launches(n, hh, SEG, DIL, "longnet")
    eng = S.ENGINES["cuda"]
    parts = []
    for launch in plan.launches[1:]:
        for call in S._calls(1, n, launch):
            qv, kv, vv = (call.view(t).transpose(1, 2) for t in (q, k, v))
            p, pl = eng.forward(qv, kv, vv, False, d**-0.5)
            parts.append((call, p.transpose(1, 2), pl.transpose(1, 2)))
    o = out0.clone()
    l = lse0.clone()

    def merges(parts=parts, o=o, l=l):
        for call, p, pl in parts:
            S.merge_into(call.view(o), call.view(l), p, pl)

    tiles = [(32, 4), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8)]
    t = {x: [] for x in tiles}
    for x in tiles:
        S.MERGE_TILE = x
        merges()
    for _ in range(9):
        for x in tiles:
            S.MERGE_TILE = x
            t[x].append(ev(merges))
    S.MERGE_TILE = (64, 4)
    log(f"d={d} merges ms by tile", {str(x): round(statistics.median(v_), 3) for x, v_ in t.items()})
    # scatter: add three sources into three targets for the same calls
    tg = [torch.zeros(1, n, hh, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    srcs = [(call, [p] * 3) for call, p, _ in parts]

    def scat(srcs=srcs, tg=tg):
        for call, ss in srcs:
            R.scatter_into([call.view(x) for x in tg], ss, [True, True, True])

    t = {x: [] for x in tiles}
    for x in tiles:
        R.ROWS_TILE = x
        scat()
    for _ in range(9):
        for x in tiles:
            R.ROWS_TILE = x
            t[x].append(ev(scat))
    R.ROWS_TILE = (64, 4)
    log(f"d={d} scatter-add x3 ms by tile", {str(x): round(statistics.median(v_), 3) for x, v_ in t.items()})
    del parts, srcs, tg, o, l, q, k, v, out0
# head_groups forward engine vs Triton
g = torch.Generator(device="cuda").manual_seed(2)
saved = FW.forward_prefers_triton
for d, hh in ((64, 16),):
    for div in (1, 4):
        q, k, v = (
            torch.randn(1, n // div, hh, d, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(3)
        )
        for causal in (False, True):
            f = functools.partial(
                dilated_attention, q, k, v, SEG, DIL, mode="head_groups", causal=causal, backend="triton"
            )
            t = {False: [], True: []}
            with torch.no_grad():
                for on in (False, True):
                    FW.forward_prefers_triton = (lambda *a: False) if on else saved
                    f()
                    f()
                for _ in range(11):
                    for on in (False, True):
                        FW.forward_prefers_triton = (lambda *a: False) if on else saved
                        t[on].append(ev(f))
            FW.forward_prefers_triton = saved
            log(
                f"hg fwd n/{div} causal={causal} triton/engine ms",
                [round(statistics.median(t[False]), 3), round(statistics.median(t[True]), 3)],
            )
