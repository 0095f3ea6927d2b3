# Ran at 162ebea (the kernels of this folder's other runs) on one H200, 2026-12-01 04:10-04:15 UTC:
#   python3 forward_gaps_probe.py  (OUT: a folder for its JSON)
"""Probe: where the causal forward's wall time beyond its kernels goes (host time per call, trace)."""

import json
import os
import time

import dilated_attn_bench.kernel as K
import torch
from torch.profiler import ProfilerActivity, profile

OUT = os.environ["OUT"]
res = {}


def log(k, v):
    res[k] = v
    print(k, v, flush=True)
    json.dump(res, open(f"{OUT}/probe12.json", "w"), indent=1, default=str)


n = 1 << 20
for mode in ("longnet", "head_groups"):
    for causal in (False, True):
        fn, tensors = K._dilated_closures(n, mode, "triton", grad=False, causal=causal)
        fn()
        fn()
        torch.cuda.synchronize()
        host = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        gpu = K._time_ms(fn)
        # one call alone, synchronised around it
        one = []
        for _ in range(5):
            torch.cuda.synchronize()
            a = torch.cuda.Event(True)
            b = torch.cuda.Event(True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            one.append(a.elapsed_time(b))
        log(
            f"{mode} causal={causal}",
            {
                "host_ms_per_call": [round(x, 2) for x in host],
                "timed_ms": round(gpu, 2),
                "alone_ms": [round(x, 2) for x in one],
            },
        )
        if mode == "longnet":
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    fn()
                torch.cuda.synchronize()
            prof.export_chrome_trace(f"{OUT}/trace_{mode}_{'causal' if causal else 'full'}.json")
            ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
            ev.sort(key=lambda e: e.time_range.start)
            gaps = []
            for a_, b_ in zip(ev, ev[1:]):
                gap = (b_.time_range.start - a_.time_range.end) / 1000
                if gap > 0.05:
                    gaps.append((round(gap, 3), a_.name[:50], b_.name[:50]))
            log(f"gaps>0.05ms {mode} causal={causal}", sorted(gaps, reverse=True)[:20])
        del fn, tensors
        K._free()
