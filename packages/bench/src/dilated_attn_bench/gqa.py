"""Grouped-query attention: K/V read in place against K/V repeated to every query head.

For each K/V head count, times ``dilated_attention`` forward and forward+backward with ``(b, n, h_kv,
d)`` K/V (backends with the ``gqa`` capability read them in place) and with the same K/V repeated to
``h`` heads first (what a backend without it gets), and records the peak memory of each beyond the
inputs, in one process.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from dilated_attn import dilated_attention, get_backend

from dilated_attn_bench.timing import time_calls


def _peak_beyond(fn: Any, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def _measure(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    path: str,
    w: Any,
    r: Any,
    causal: bool,
    repeats: int,
) -> dict[str, Any]:
    device = q.device
    group = q.shape[2] // k.shape[2]
    dout = torch.randn_like(q)

    def kv() -> tuple[torch.Tensor, torch.Tensor]:
        if path == "repeated":
            return k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
        return k, v

    def fwd() -> None:
        with torch.no_grad():
            dilated_attention(q, *kv(), w, r, causal=causal)

    def fwd_bwd() -> None:
        out = dilated_attention(q, *kv(), w, r, causal=causal)
        torch.autograd.grad(out, (q, k, v), dout)

    return {
        "kv_heads": k.shape[2],
        "path": path,
        "fwd_ms": time_calls(fwd, device, warmup=3, repeats=repeats, budget_s=None).median_ms,
        "fwd_bwd_ms": time_calls(fwd_bwd, device, warmup=2, repeats=repeats, budget_s=None).median_ms,
        "fwd_peak_gib": _peak_beyond(fwd, device),
        "fwd_bwd_peak_gib": _peak_beyond(fwd_bwd, device),
    }


def main(args: argparse.Namespace) -> int:
    """``dilated-attn-bench gqa``: a markdown table and ``--out`` JSON."""
    from dilated_attn_bench.cli import UsageError
    from dilated_attn_bench.presets import expand

    if not torch.cuda.is_available():
        raise UsageError("needs a CUDA device")
    (workload,) = expand([args.preset])
    device = torch.device("cuda")
    w, r = workload.pattern.segment_lengths, workload.pattern.dilation_rates
    b, n, h, d, dtype = (
        workload.batch,
        args.n or workload.seq_len,
        workload.heads,
        workload.head_dim,
        workload.dtype,
    )
    native = get_backend("triton").capabilities.gqa
    rows = []
    for h_kv in args.kv_heads:
        if h % h_kv:
            raise UsageError(f"--kv-heads {h_kv} must divide the {h} query heads")
        q = torch.randn(b, n, h, d, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(b, n, h_kv, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        for path in ("in place", "repeated"):
            rows.append(_measure(q, k, v, path, w, r, workload.causal, args.repeats))
        del q, k, v
        torch.cuda.empty_cache()
    lines = [
        f"# Grouped-query attention, {args.preset} n={n} ({torch.cuda.get_device_name()}; triton gqa={native})",
        "",
        "| kv heads | K/V | fwd ms | fwd+bwd ms | fwd peak GiB | fwd+bwd peak GiB |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['kv_heads']} | {row['path']} | {row['fwd_ms']:.2f} | {row['fwd_bwd_ms']:.2f} | "
            f"{row['fwd_peak_gib']:.2f} | {row['fwd_bwd_peak_gib']:.2f} |"
        )
    print("\n".join(lines))
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2))
    return 0
