"""The segment engine's calls per offset class against calls that take classes as heads, and the
Triton kernels, in one process (``engine-calls.json``): forward and forward+backward over the cuDNN
segment ceiling, plus the host time to issue one forward.

Run with the packages installed on a CUDA machine: ``python engine_calls_probe.py`` (``OUT`` names
the output folder).
"""

import dataclasses
import json
import os
import time

import torch
from dilated_attn.kernels import segments
from dilated_attn_bench.kernel import _check, _dilated_closures, _guarded, ceiling, throughput
from torch.nn.attention import SDPBackend

out = os.environ.get("OUT", ".")
combined = segments._calls


def per_class(b, n, launch, *, rows_per_call=None):
    """The calls as they were: one per offset class."""
    for call in combined(b, n, launch, rows_per_call=rows_per_call):
        if call.row_step == 0:
            yield call
        else:
            for c in range(call.size):
                yield dataclasses.replace(
                    call, o=call.o + c, head=call.head + c, size=1, row_step=0, head_step=call.r
                )


res = {}
t0 = time.time()
gate = {}
for mode in ("longnet", "head_groups"):
    for causal in (False, True):
        shape, w, r = (2, 8195, 16, 64), (256, 1024, 2048), (1, 4, 16)
        gate[f"{mode} {causal}"] = _guarded(_check, shape, w, r, torch.bfloat16, mode, causal)
print("gate", all(r.get("passed") for r in gate.values()), flush=True)
res["gate"] = gate
n = 1 << 20
rows = [
    ("exact", n, "longnet", False, 16, 64),
    ("exact causal", n, "longnet", True, 16, 64),
    ("head_groups", n, "head_groups", False, 16, 64),
    ("hg causal", n, "head_groups", True, 16, 64),
    ("d=128", n, "longnet", False, 8, 128),
    ("n/4", n // 4, "longnet", False, 16, 64),
    ("n/4 hg", n // 4, "head_groups", False, 16, 64),
]
for grad in (False, True):
    for label, nn, mode, causal, h, d in rows:
        if grad and label in ("hg causal", "n/4 hg"):
            continue
        shape = dict(causal=causal, heads=h, head_dim=d)
        c = _guarded(ceiling, nn, SDPBackend.CUDNN_ATTENTION, grad=grad, **shape)
        row = {"ceiling": c}
        for name in ("combined", "per_class", "triton"):
            segments._calls = per_class if name == "per_class" else combined
            if name == "triton":
                os.environ["DILATED_ATTN_ENGINE"] = "triton"
            row[name] = _guarded(throughput, nn, mode, "triton", grad=grad, **shape)
            os.environ.pop("DILATED_ATTN_ENGINE", None)
            if "tflops" in row[name] and "tflops" in c:
                row[name]["ratio"] = row[name]["tflops"] / c["tflops"]
        segments._calls = combined
        summary = " | ".join(
            f"{k} {v.get('ms', -1):.2f} ms {v.get('ratio', -1):.3f}" for k, v in row.items() if k != "ceiling"
        )
        print("fwd+bwd" if grad else "fwd", label, f"ceiling {c.get('ms', -1):.2f}", summary, flush=True)
        res[("fwd+bwd " if grad else "fwd ") + label] = row
for nn in (n // 4, n):
    for mode in ("longnet", "head_groups"):
        fn, _ = _dilated_closures(nn, mode, "triton", grad=False, causal=False, heads=16, head_dim=64)
        for _ in range(3):
            fn()
        host = []
        for _ in range(10):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        res[f"host {nn} {mode}"] = sorted(host)[5] * 1e3
        print("host time to issue one forward", nn, mode, f"{res[f'host {nn} {mode}']:.2f} ms", flush=True)
with open(f"{out}/engine-calls.json", "w") as f:
    json.dump(res, f, indent=1, default=str)
