"""``ring``: exactness and weak scaling of ``ring_dilated_attention`` on GPUs over NCCL.

    torchrun --nproc-per-node 2 -m dilated_attn_bench ring --out ring.json
    dilated-attn-bench ring --out ring1.json      # one GPU: the baseline only

1. Exactness at a small size: every rank's chunk against the float64 oracle on the gathered
   sequence, forward and the three gradients, both modes, causal and not, segments inside, across
   and spanning the chunks (bf16 on the fused kernels, fp32 on the math path).
2. Weak scaling with the ``longnet-1m`` settings (bf16, b=1, h=16, d=64, w=2048..32768,
   r=1..16): ``n_local`` tokens per GPU (default 1M) on one GPU, then ``world * n_local`` over all
   of them. Forward and forward+backward, CUDA events, median of ``--iters``; per-GPU peak memory.
   The one-GPU baseline runs on rank 0 alone, both through the ring (a group of one) and through the
   core's ``dilated_attention(backend="auto")``.
3. The same with one more pattern whose segment is the whole sequence (``w = n``, ``r = 64``), so
   that it spans every GPU: the distributed path at scale. Its work per GPU grows with the world
   size, so the comparison there is per-GPU useful TFLOP/s, not time.

Prints a table on rank 0 and writes everything (device, date, versions) as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from dilated_attn import DilationPattern, dilated_attention
from dilated_attn.reference import dilated_attention_reference
from dilated_attn.tolerances import TOLERANCES, relative_error
from dilated_attn_ring import ring_dilated_attention

from dilated_attn_bench.cli import UsageError, writable_file
from dilated_attn_bench.timing import time_calls

LONGNET_W = (2048, 4096, 8192, 16384, 32768)
LONGNET_R = (1, 2, 4, 8, 16)
HEADS, HEAD_DIM = 16, 64

# (name, n_local, segment_lengths, dilation_rates, heads): small problems for the exactness check.
CHECKS = [
    # 512 divides n_local; 1536 = n_local; 2048 spans two chunks unaligned; 10**6 is the whole sequence.
    ("aligned", 1536, (512, 1536, 2048, 10**6), (1, 2, 4, 8), 4),
    # n_local odd and not a multiple of any segment; r = 3, 5 give heads of unequal row counts.
    ("unaligned", 1000, (300, 768, 2500), (1, 3, 5), 5),
]


def _init() -> tuple[int, int, torch.device]:
    if "RANK" in os.environ:
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)


def _gather_rows(t: torch.Tensor, world: int) -> torch.Tensor:
    bufs = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(bufs, t.contiguous())
    return torch.cat(bufs, dim=1)


def _check_one(
    rank: int,
    world: int,
    device: torch.device,
    problem: tuple[Any, ...],
    dtype: torch.dtype,
    mode: str,
    causal: bool,
) -> dict[str, Any]:
    name, m, w, r, h = problem
    n = m * world
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}-{mode}-{causal}".encode()))
    q64, k64, v64, dout = (
        torch.randn(1, n, h, HEAD_DIM, generator=g, dtype=torch.float64).to(device) for _ in range(4)
    )
    rows = slice(rank * m, (rank + 1) * m)
    q, k, v = (t[:, rows].to(dtype).requires_grad_() for t in (q64, k64, v64))
    out = ring_dilated_attention(q, k, v, w, r, mode=mode, causal=causal)
    out.backward(dout[:, rows].to(dtype))
    got = [_gather_rows(t, world) for t in (out.detach(), q.grad, k.grad, v.grad) if t is not None]
    qr, kr, vr = (t.to(dtype).double().requires_grad_() for t in (q64, k64, v64))
    ref = dilated_attention_reference(qr, kr, vr, w, r, mode=mode, causal=causal)
    ref.backward(dout.to(dtype).double())
    # The oracle's leaves always receive gradients.
    expected = [ref, *(x.grad for x in (qr, kr, vr) if x.grad is not None)]
    errors = {key: relative_error(a, e) for key, a, e in zip(("out", "dq", "dk", "dv"), got, expected)}
    fwd_tol, grad_tol = TOLERANCES[dtype]
    ok = len(got) == 4 and errors["out"] <= fwd_tol and all(errors[k] <= grad_tol for k in ("dq", "dk", "dv"))
    return {
        "problem": name,
        "dtype": str(dtype).removeprefix("torch."),
        "mode": mode,
        "causal": causal,
        "errors": errors,
        "ok": ok,
    }


def _check(rank: int, world: int, device: torch.device) -> list[dict[str, Any]]:
    """Exactness of every check problem, dtype, mode and causality against the oracle."""
    return [
        _check_one(rank, world, device, problem, dtype, mode, causal)
        for problem in CHECKS
        for dtype in (torch.bfloat16, torch.float32)
        for mode in ("longnet", "head_groups")
        for causal in (False, True)
    ]


def _median_ms(fn: Callable[[], None], warmup: int, iters: int, group: dist.ProcessGroup) -> float:
    """Median ms of ``iters`` calls after ``warmup``, every rank of ``group`` starting together."""
    dist.barrier(group=group)
    return time_calls(fn, torch.device("cuda"), warmup=warmup, repeats=iters, budget_s=None).median_ms


def _measure(
    attend: Callable[..., torch.Tensor],
    gpus: int,
    w: tuple[int, ...],
    r: tuple[int, ...],
    device: torch.device,
    group: dist.ProcessGroup,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Times, peak memory of one fwd+bwd, and useful TFLOP/s per GPU, on ``args.n_local`` tokens here."""
    shape = (1, args.n_local, HEADS, HEAD_DIM)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device=device, dtype=torch.bfloat16)

    def forward() -> None:
        with torch.no_grad():
            attend(q, k, v, w, r)

    def forward_backward() -> None:
        attend(q, k, v, w, r).backward(dout)
        for t in (q, k, v):
            t.grad = None

    fwd = _median_ms(forward, args.warmup, args.iters, group)
    fwd_bwd = _median_ms(forward_backward, args.warmup, args.iters, group)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    forward_backward()
    torch.cuda.synchronize()
    flops = DilationPattern(w, r).flops(args.n_local * gpus, HEADS, HEAD_DIM) / gpus
    return {
        "gpus": gpus,
        "fwd_ms": fwd,
        "fwd_bwd_ms": fwd_bwd,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "fwd_tflops_per_gpu": flops / fwd / 1e9,
        "fwd_bwd_tflops_per_gpu": 3.5 * flops / fwd_bwd / 1e9,
    }


def _worst(value: float, op: dist.ReduceOp.RedOpType) -> float:
    t = torch.tensor([value], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=op)
    return float(t.item())


def _scaling(
    rank: int,
    world: int,
    device: torch.device,
    solo: Any,
    w: tuple[int, ...],
    r: tuple[int, ...],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The one-GPU baselines on rank 0 (the others wait), then the ring over every GPU."""
    result: dict[str, Any] = {"segment_lengths": list(w), "dilation_rates": list(r), "n_local": args.n_local}
    if rank == 0:

        def ring_alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_: Any, r_: Any) -> Any:
            return ring_dilated_attention(q, k, v, w_, r_, group=solo)

        def core_auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_: Any, r_: Any) -> Any:
            return dilated_attention(q, k, v, w_, r_)

        result["ring_1gpu"] = _measure(ring_alone, 1, w, r, device, solo, args)
        torch.cuda.empty_cache()
        result["core_1gpu"] = _measure(core_auto, 1, w, r, device, solo, args)
        torch.cuda.empty_cache()
    dist.barrier()
    if world > 1:

        def ring_all(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_: Any, r_: Any) -> Any:
            return ring_dilated_attention(q, k, v, w_, r_)

        world_group = dist.group.WORLD
        assert world_group is not None
        mine = _measure(ring_all, world, w, r, device, world_group, args)
        torch.cuda.empty_cache()
        # The slowest GPU and the fullest one are what a training step sees.
        worst = {
            key: _worst(value, dist.ReduceOp.MAX)
            for key, value in mine.items()
            if key.endswith(("ms", "gib"))
        }
        best = {key: _worst(value, dist.ReduceOp.MIN) for key, value in mine.items() if "tflops" in key}
        result[f"ring_{world}gpu"] = {**mine, **worst, **best}
    return result


def _table(title: str, result: dict[str, Any], world: int) -> str:
    lines = [
        title,
        f"{'run':<12} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak GiB':>9} {'fwd TF/s':>9} {'f+b TF/s':>9}",
    ]
    for key in ("core_1gpu", "ring_1gpu", *((f"ring_{world}gpu",) if world > 1 else ())):
        if key in result:
            x = result[key]
            lines.append(
                f"{key:<12} {x['fwd_ms']:9.1f} {x['fwd_bwd_ms']:11.1f} {x['peak_gib']:9.2f} "
                f"{x['fwd_tflops_per_gpu']:9.1f} {x['fwd_bwd_tflops_per_gpu']:9.1f}"
            )
    if world > 1:
        many, one = result[f"ring_{world}gpu"], result["ring_1gpu"]
        lines.append(
            f"ratio {world} GPUs / 1 GPU (ring): fwd {many['fwd_ms'] / one['fwd_ms']:.3f}, "
            f"fwd+bwd {many['fwd_bwd_ms'] / one['fwd_bwd_ms']:.3f}, peak memory {many['peak_gib'] / one['peak_gib']:.3f}"
        )
        core = result["core_1gpu"]
        lines.append(
            f"ratio {world} GPUs / 1 GPU (core auto): fwd {many['fwd_ms'] / core['fwd_ms']:.3f}, "
            f"fwd+bwd {many['fwd_bwd_ms'] / core['fwd_bwd_ms']:.3f}, peak memory {many['peak_gib'] / core['peak_gib']:.3f}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """The ``ring`` command (arguments parsed by ``dilated_attn_bench.cli``); 1 when a check fails."""
    if not torch.cuda.is_available():
        raise UsageError("needs CUDA devices (NCCL)")
    writable_file("--out", args.out)
    rank, world, device = _init()
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device),
        "world": world,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "settings": {
            "dtype": "bfloat16",
            "batch": 1,
            "heads": HEADS,
            "head_dim": HEAD_DIM,
            **{key: getattr(args, key) for key in ("out", "n_local", "iters", "warmup", "no_spanning")},
        },
    }
    report["exactness"] = _check(rank, world, device)
    failures = [row for row in report["exactness"] if not row["ok"]]
    # Every rank takes part in creating the group; only rank 0 is in it.
    solo = dist.new_group([0])
    report["longnet_1m"] = _scaling(rank, world, device, solo, LONGNET_W, LONGNET_R, args)
    if not args.no_spanning:
        report["spanning"] = _scaling(
            rank, world, device, solo, (*LONGNET_W, 1 << 40), (*LONGNET_R, 64), args
        )

    if rank == 0:
        worst = max(max(row["errors"].values()) for row in report["exactness"])
        print(
            f"exactness: {len(report['exactness']) - len(failures)}/{len(report['exactness'])} within bounds "
            f"(worst relative error {worst:.2e})"
        )
        for row in failures:
            print("  FAILED", row)
        print(
            _table(f"longnet-1m, {args.n_local} tokens per GPU, world {world}", report["longnet_1m"], world)
        )
        if "spanning" in report:
            print(_table("longnet-1m + (w = n, r = 64) spanning every GPU", report["spanning"], world))
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failures else 0
