"""dQ recomputed against dQ by tile reductions (``DILATED_ATTN_TRITON_DQ``), forward+backward at
``longnet-1m`` beside the cuDNN segment ceiling, after an oracle gate on the reductions.

    python kernel_dq_reductions.py    # writes $OUT/ab.json (default /tmp) and $OUT/winner
"""

import json
import os

import torch
from dilated_attn.kernels.backward import DQ_ENV, _dkdv_tuned, _dq_tuned
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
    gate = {}
    for causal in (False, True):
        for mode in ("longnet", "head_groups"):
            os.environ[DQ_ENV] = "atomic"
            record = _guarded(_check, (1, 8195, 4, 64), (256, 1024), (1, 3), torch.bfloat16, mode, causal)
            gate[f"{mode} causal={causal}"] = record
            print("gate", mode, causal, record, flush=True)
    passed = all(r.get("passed") for r in gate.values())
    n = 1 << 20
    results: dict = {"gate": gate}
    for label, mode, causal, heads, head_dim in ROWS:
        shape = {"causal": causal, "heads": heads, "head_dim": head_dim}
        cap = _guarded(ceiling, n, SDPBackend.CUDNN_ATTENTION, grad=True, **shape)
        row = {"ceiling": cap}
        for setting in ("recompute", "atomic"):
            os.environ[DQ_ENV] = setting
            row[setting] = _guarded(throughput, n, mode, "triton", grad=True, **shape)
            if "tflops" in row[setting] and "tflops" in cap:
                row[setting]["ratio"] = row[setting]["tflops"] / cap["tflops"]
        print(label, {k: (v.get("ms"), v.get("ratio")) for k, v in row.items()}, flush=True)
        results[label] = row
    results["configs"] = {
        "dkdv": {str(k): str(v) for k, v in _dkdv_tuned.cache.items()},
        "dq": {str(k): str(v) for k, v in _dq_tuned.cache.items()},
    }
    with open(f"{OUT}/ab.json", "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    exact = results["exact"]
    faster = passed and exact["atomic"].get("ms", 1e9) < exact["recompute"].get("ms", 0)
    with open(f"{OUT}/winner", "w") as fh:
        fh.write("atomic" if faster else "recompute")


if __name__ == "__main__":
    main()
