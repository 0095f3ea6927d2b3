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
   The same causal (``--no-causal`` skips it).
3. The same with one more pattern whose segment is the whole sequence (``w = n``, ``r = 64``), so
   that it spans every GPU: the distributed path at scale. Its work per GPU grows with the world
   size, so the comparison there is per-GPU useful TFLOP/s, not time.
4. The longest local length: forward+backward through the ring over every GPU at each of
   ``--longest`` tokens per GPU, recording which fit (an out-of-memory is a result, not an error).

Every ratio is against the core's ``auto`` backend on one GPU with the same local length (the
strongest single-GPU path a user has), with the targets of the ring's scaling issue beside it.

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
    causal: bool = False,
) -> dict[str, float]:
    """Times, peak memory of one fwd+bwd, and useful TFLOP/s per GPU, on ``args.n_local`` tokens here."""
    shape = (1, args.n_local, HEADS, HEAD_DIM)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device=device, dtype=torch.bfloat16)

    def forward() -> None:
        with torch.no_grad():
            attend(q, k, v, w, r, causal)

    def forward_backward() -> None:
        attend(q, k, v, w, r, causal).backward(dout)
        for t in (q, k, v):
            t.grad = None

    fwd = _median_ms(forward, args.warmup, args.iters, group)
    fwd_bwd = _median_ms(forward_backward, args.warmup, args.iters, group)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    forward_backward()
    torch.cuda.synchronize()
    flops = DilationPattern(w, r).flops(args.n_local * gpus, HEADS, HEAD_DIM, causal=causal) / gpus
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
    causal: bool = False,
) -> dict[str, Any]:
    """The one-GPU baselines on rank 0 (the others wait), then the ring over every GPU."""
    result: dict[str, Any] = {
        "segment_lengths": list(w),
        "dilation_rates": list(r),
        "n_local": args.n_local,
        "causal": causal,
    }
    if rank == 0:

        def ring_alone(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_: Any, r_: Any, c: bool) -> Any:
            return ring_dilated_attention(q, k, v, w_, r_, causal=c, group=solo)

        def core_auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_: Any, r_: Any, c: bool) -> Any:
            return dilated_attention(q, k, v, w_, r_, causal=c)

        if not args.no_ring_alone:
            result["ring_1gpu"] = _measure(ring_alone, 1, w, r, device, solo, args, causal)
            torch.cuda.empty_cache()
        result["core_1gpu"] = _measure(core_auto, 1, w, r, device, solo, args, causal)
        torch.cuda.empty_cache()
    dist.barrier()
    if world > 1:

        def ring_all(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_: Any, r_: Any, c: bool) -> Any:
            return ring_dilated_attention(q, k, v, w_, r_, causal=c)

        world_group = dist.group.WORLD
        assert world_group is not None
        mine = _measure(ring_all, world, w, r, device, world_group, args, causal)
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


# The ring scaling issue's targets: ring time and peak per GPU over core auto's on one GPU.
TARGET_TIME, TARGET_PEAK, TARGET_LONGEST, TARGET_SPANNING = 1.10, 1.15, 6 << 20, 0.90


def _verdict(value: float, target: float | None, *, at_most: bool = True, unit: str = "") -> str:
    """``value`` with its unit and, given a target, whether it meets it."""
    text = f"{value:.3f}{unit}"
    if target is None:
        return text
    ok = value <= target if at_most else value >= target
    return f"{text} ({'<=' if at_most else '>='} {target:g}{unit}: {'met' if ok else 'MISSED'})"


def _table(title: str, result: dict[str, Any], world: int, *, time_targets: bool = True) -> str:
    """The runs of one scaling case; ``time_targets=False`` where the work per GPU grows with the
    world (the spanning pattern), so time ratios are shown without a verdict."""
    time_target = TARGET_TIME if time_targets else None
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
        many, core = result[f"ring_{world}gpu"], result["core_1gpu"]
        if "ring_1gpu" in result:
            one = result["ring_1gpu"]
            lines.append(
                f"ratio {world} GPUs / 1 GPU (ring): fwd {many['fwd_ms'] / one['fwd_ms']:.3f}, "
                f"fwd+bwd {many['fwd_bwd_ms'] / one['fwd_bwd_ms']:.3f}, "
                f"peak memory {many['peak_gib'] / one['peak_gib']:.3f}"
            )
        lines.append(
            f"ratio {world} GPUs / 1 GPU (core auto): fwd {_verdict(many['fwd_ms'] / core['fwd_ms'], time_target)}, "
            f"fwd+bwd {_verdict(many['fwd_bwd_ms'] / core['fwd_bwd_ms'], time_target)}, "
            f"peak memory {_verdict(many['peak_gib'] / core['peak_gib'], TARGET_PEAK)}"
        )
    return "\n".join(lines)


def _spanning_line(base: dict[str, Any], spanning: dict[str, Any], world: int) -> str:
    """Per-GPU useful TFLOP/s with the spanning pattern over those without it, ring over every GPU."""
    key = f"ring_{world}gpu" if world > 1 else "core_1gpu"
    parts = [
        f"{label} {_verdict(spanning[key][f] / base[key][f], TARGET_SPANNING, at_most=False)}"
        for label, f in (("fwd", "fwd_tflops_per_gpu"), ("fwd+bwd", "fwd_bwd_tflops_per_gpu"))
    ]
    return f"spanning / local-only per-GPU TFLOP/s ({key}): " + ", ".join(parts)


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def _all_ok(ok: bool, device: torch.device) -> bool:
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _fwd_bwd_twice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor) -> list[float]:
    """ms of two forward+backward calls through the ring on longnet-1m's pattern."""
    times = []
    for _ in range(2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        ring_dilated_attention(q, k, v, LONGNET_W, LONGNET_R).backward(dout)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        q.grad = k.grad = v.grad = None
    return times


def _longest(rank: int, world: int, device: torch.device, sizes: list[int]) -> list[dict[str, Any]]:
    """Forward+backward through the ring over every GPU at each local length; which ones fit.

    Sizes are multiples of the longest segment (checked by ``main``), so the call exchanges no pieces:
    its one collective comes first, and a rank that runs out of memory after it leaves no peer waiting.
    The ranks agree that every input was allocated before the call and on the outcome after it. Each
    size runs twice when it fits: the first call's time (plan building, allocator growth) and the second's.
    """
    rows = []
    for n_local in sizes:
        shape = (1, n_local, HEADS, HEAD_DIM)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        times: list[float] = []
        error = ""
        tensors: list[torch.Tensor] = []
        try:
            tensors = [torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(4)]
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            error = str(exc).splitlines()[0]
        fits = _all_ok(not error, device)
        if fits:
            for t in tensors[:3]:
                t.requires_grad_()
            try:
                times = _fwd_bwd_twice(*tensors)
            except Exception as exc:
                if not _out_of_memory(exc):
                    raise
                error = str(exc).splitlines()[0]
            fits = _all_ok(not error, device)
        tensors = []  # free before the next size
        torch.cuda.empty_cache()
        peak = _worst(torch.cuda.max_memory_allocated(device) / 2**30, dist.ReduceOp.MAX)
        if not fits and not error:
            error = "out of memory on another rank"
        rows.append(
            {
                "n_local": n_local,
                "fits": fits,
                "first_ms": times[0] if times else float("nan"),
                "ms": times[1] if len(times) > 1 else float("nan"),
                "peak_gib": peak,
                "error": error,
            }
        )
        if not fits:
            break
    return rows


def main(args: argparse.Namespace) -> int:
    """The ``ring`` command (arguments parsed by ``dilated_attn_bench.cli``); 1 when a check fails."""
    writable_file("--out", args.out)
    odd = [n for n in args.longest if n % max(LONGNET_W)]
    if odd:
        raise UsageError(
            f"--longest sizes {odd} must be multiples of the longest segment, {max(LONGNET_W)} (so that "
            "the probe exchanges no pieces and an out-of-memory rank leaves no peer waiting)"
        )
    if not torch.cuda.is_available():
        raise UsageError("needs CUDA devices (NCCL)")
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
            **{
                key: getattr(args, key)
                for key in (
                    "out",
                    "n_local",
                    "iters",
                    "warmup",
                    "no_spanning",
                    "no_causal",
                    "no_ring_alone",
                    "longest",
                )
            },
        },
    }
    report["exactness"] = _check(rank, world, device)
    failures = [row for row in report["exactness"] if not row["ok"]]
    # Every rank takes part in creating the group; only rank 0 is in it.
    solo = dist.new_group([0])
    report["longnet_1m"] = _scaling(rank, world, device, solo, LONGNET_W, LONGNET_R, args)
    if not args.no_causal:
        report["longnet_1m_causal"] = _scaling(rank, world, device, solo, LONGNET_W, LONGNET_R, args, True)
    if not args.no_spanning:
        report["spanning"] = _scaling(
            rank, world, device, solo, (*LONGNET_W, 1 << 40), (*LONGNET_R, 64), args
        )
    if args.longest:
        report["longest"] = _longest(rank, world, device, args.longest)

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
        if "longnet_1m_causal" in report:
            print(
                _table(
                    f"longnet-1m causal, {args.n_local} tokens per GPU, world {world}",
                    report["longnet_1m_causal"],
                    world,
                )
            )
        if "spanning" in report:
            print(
                _table(
                    "longnet-1m + (w = n, r = 64) spanning every GPU",
                    report["spanning"],
                    world,
                    time_targets=False,
                )
            )
            print(_spanning_line(report["longnet_1m"], report["spanning"], world))
        if "longest" in report:
            fit = [row["n_local"] for row in report["longest"] if row["fits"]]
            for row in report["longest"]:
                state = (
                    f"{row['ms']:.0f} ms (first call {row['first_ms']:.0f} ms), peak {row['peak_gib']:.1f} GiB"
                    if row["fits"]
                    else f"out of memory ({row['error'][:80]})"
                )
                print(f"fwd+bwd at {row['n_local']:>9} tokens per GPU ({world} GPUs): {state}")
            print(
                "longest fwd+bwd per GPU: "
                + _verdict(
                    max(fit, default=0) / (1 << 20),
                    TARGET_LONGEST / (1 << 20),
                    at_most=False,
                    unit="M tokens",
                )
            )
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failures else 0
