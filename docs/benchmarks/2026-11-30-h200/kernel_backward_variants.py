"""Forward+backward at ``longnet-1m`` beside the cuDNN segment ceiling under each backward variant:
dQ recomputed or by tile reductions (``DILATED_ATTN_TRITON_DQ``), LSE and D head-major or not
(``backward.HEAD_MAJOR_STATS``), with the autotuner's timings of every backward tile; then the forward
at n/4 and n. An oracle gate runs every variant first.

    python kernel_backward_variants.py    # writes $OUT/ab2.json (default /tmp)
"""

import json
import os

import torch
from dilated_attn.kernels import backward
from dilated_attn_bench.kernel import _check, _guarded, ceiling, throughput
from torch.nn.attention import SDPBackend

OUT = os.environ.get("OUT", "/tmp")
ROWS = (
    ("exact", "longnet", False, 16, 64),
    ("exact causal", "longnet", True, 16, 64),
    ("head_groups", "head_groups", False, 16, 64),
    ("d=128", "longnet", False, 8, 128),
)


def main() -> None:
    results: dict = {"gate": {}}
    for head_major in (True, False):
        backward.HEAD_MAJOR_STATS = head_major
        for causal in (False, True):
            for mode in ("longnet", "head_groups"):
                for setting in ("recompute", "atomic"):
                    os.environ[backward.DQ_ENV] = setting
                    record = _guarded(
                        _check, (1, 8195, 4, 64), (256, 1024), (1, 3), torch.bfloat16, mode, causal
                    )
                    results["gate"][f"hm={head_major} {mode} causal={causal} {setting}"] = record
    print("gate", all(r.get("passed") for r in results["gate"].values()), flush=True)
    n = 1 << 20
    timings = {}
    for label, mode, causal, heads, head_dim in ROWS:
        shape = {"causal": causal, "heads": heads, "head_dim": head_dim}
        cap = _guarded(ceiling, n, SDPBackend.CUDNN_ATTENTION, grad=True, **shape)
        row = {"ceiling": cap}
        for setting in ("recompute", "atomic"):
            for head_major in (True, False):
                backward.HEAD_MAJOR_STATS = head_major
                os.environ[backward.DQ_ENV] = setting
                key = f"{setting} hm={head_major}"
                row[key] = _guarded(throughput, n, mode, "triton", grad=True, **shape)
                if "tflops" in row[key] and "tflops" in cap:
                    row[key]["ratio"] = row[key]["tflops"] / cap["tflops"]
                for name, kernel in (("dkdv", backward._dkdv_tuned), ("dq", backward._dq_tuned)):
                    tuned = getattr(kernel, "configs_timings", None)
                    if tuned:
                        timings[f"{label} {setting} {name}"] = {str(c): t for c, t in tuned.items()}
                        kernel.configs_timings = None
        print(label, {k: (v.get("ms"), v.get("ratio")) for k, v in row.items()}, flush=True)
        results[label] = row
    for length in (n // 4, n):
        cap = _guarded(ceiling, length, SDPBackend.CUDNN_ATTENTION, grad=False)
        fwd = _guarded(throughput, length, "longnet", "triton", grad=False)
        print("fwd", length, cap.get("ms"), fwd.get("ms"), flush=True)
        results[f"fwd {length}"] = {"ceiling": cap, "fwd": fwd}
    results["timings"] = timings
    with open(f"{OUT}/ab2.json", "w") as fh:
        json.dump(results, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
