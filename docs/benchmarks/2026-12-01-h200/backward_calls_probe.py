# Ran at 162ebea (the kernels of this folder's other runs) on one H200, 2026-12-01 04:10-04:15 UTC:
#   python3 backward_calls_probe.py  (OUT: a folder for its JSON)
"""Probe: the engine backward's call size (rows x heads per library call) at 1M and n/4, and where the
forward's time goes (kernel profile), exact and causal."""

import json
import os

import dilated_attn_bench.kernel as K
import torch
from dilated_attn.kernels import segments as S
from torch.nn.attention import SDPBackend
from torch.profiler import ProfilerActivity, profile

OUT = os.environ["OUT"]
res = {}


def log(k, v):
    res[k] = v
    print(k, v, flush=True)
    json.dump(res, open(f"{OUT}/probe11.json", "w"), indent=1, default=str)


log(
    "versions",
    {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "cuda": torch.version.cuda},
)
sizes = [1 << 18, 1 << 19, 1 << 20, 1 << 21]
for n in (1 << 18, 1 << 20):
    times = {s: [] for s in sizes}
    ceil = []
    closures = {}
    fn, tensors = K._dilated_closures(n, "longnet", "triton", grad=True)
    for s in sizes:  # warm each size (cuDNN plans per shape)
        S.BACKWARD_ROWS_PER_CALL = s
        fn()
    for _ in range(3):
        ceil.append(K.ceiling(n, SDPBackend.CUDNN_ATTENTION, grad=True)["ms"])
        for s in sizes:
            S.BACKWARD_ROWS_PER_CALL = s
            times[s].append(K._time_ms(fn))
    mem = {}
    for s in sizes:
        S.BACKWARD_ROWS_PER_CALL = s
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        r = fn()
        torch.cuda.synchronize()
        mem[s] = round((torch.cuda.max_memory_allocated() - before) / 2**20)
        del r
    S.BACKWARD_ROWS_PER_CALL = 1 << 19
    log(
        f"n={n} fwd+bwd ms by rows per backward call",
        {str(s): [round(x, 2) for x in v] for s, v in times.items()},
    )
    log(f"n={n} ceiling fwd+bwd ms", [round(x, 2) for x in ceil])
    log(f"n={n} peak MiB beyond inputs (incl. grads)", {str(s): m for s, m in mem.items()})
    del fn, tensors
    K._free()


n = 1 << 20
for causal in (False, True):
    for grad in (False, True):
        fn, tensors = K._dilated_closures(n, "longnet", "triton", grad=grad, causal=causal)
        fn()
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        rows = []
        total = 0.0
        for e in prof.key_averages():
            t = e.device_time_total / 1000
            if t <= 0:
                continue
            total += t
            rows.append((round(t, 3), e.count, e.key[:110]))
        rows.sort(reverse=True)
        log(
            f"profile causal={causal} grad={grad} (ms, count, kernel)",
            {"total_ms": round(total, 2), "kernels": rows[:14]},
        )
        del fn, tensors
        K._free()
