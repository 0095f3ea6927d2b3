"""``sparse``: block-sparse attention against dense cuDNN attention on one GPU, measured in one process.

For block densities of 1 %, 5 % and 25 %, times ``block_sparse_attention`` (forward, and forward +
backward) with ``local_window``, ``random_blocks`` and ``dilated_blocks`` patterns sized to that
density, and dense SDPA (cuDNN, flash) on the same shape; reports ``time / (dense cuDNN time x
density)``, whose target is <= 1.3. A correctness check against the float64 reference at a small
length (not a multiple of the block size) runs first.

    dilated-attn-bench sparse --out sparse_bench.json --md sparse_bench.md

Forward times are taken with inputs that require grad (the forward of a training step), for the
sparse and the dense kernels alike. ``--device cpu`` runs the same steps at a toy size (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from dilated_attn.tolerances import TOLERANCES, relative_error
from dilated_attn_sparse import (
    SparsePattern,
    block_sparse_attention,
    dilated_blocks,
    local_window,
    random_blocks,
)
from dilated_attn_sparse.cache import block_masks
from dilated_attn_sparse.reference import dense_mask, masked_attention_reference
from dilated_attn_sparse.tuning import default_kernel_options, neighbour_share
from torch.nn.attention import SDPBackend, sdpa_kernel

from dilated_attn_bench.choices import SPARSE_KINDS as KINDS
from dilated_attn_bench.cli import UsageError, writable_file
from dilated_attn_bench.timing import time_calls

TARGET = 1.3
# Timed calls of one measurement, at most: fewer when the budget runs out, never fewer than 3.
MAX_REPS = 50
DENSE_BACKENDS = {
    "cuda": {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION},
    "cpu": {"math": SDPBackend.MATH},
}


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, budget_s: float) -> dict[str, Any]:
    """First call (compiles, builds masks) timed on its own, then the median of >= 3 timed calls."""
    timing = time_calls(fn, device, warmup=1, repeats=MAX_REPS, budget_s=budget_s)
    assert timing.first_ms is not None and timing.min_ms is not None
    return {
        "ms": timing.median_ms,
        "min_ms": timing.min_ms,
        "reps": timing.repeats,
        "first_call_s": timing.first_ms / 1e3,
    }


def inputs(
    n: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (1, n, heads, head_dim)
    return tuple(torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(4))


def check_case(
    name: str,
    pattern: SparsePattern,
    causal: bool,
    dtype: torch.dtype,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    n, h = args.check_n, 4
    fwd_tol, grad_tol = TOLERANCES[dtype]
    q, k, v, dout = inputs(n, h, args.head_dim, dtype, device, seed=hash(name) % 2**31)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = block_sparse_attention(
        q,
        k,
        v,
        pattern,
        causal=causal,
        block_size=args.block_size,
        return_lse=True,
        kernel_options=args.kernel_options,
    )
    allowed = dense_mask(pattern, n, h, causal=causal)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = masked_attention_reference(q64, k64, v64, allowed, return_lse=True)
    empty = torch.isneginf(ref_lse)
    # Gradients flow in through lse as well as out (as when a composer merges partial results).
    g = torch.Generator(device=device).manual_seed(1)
    dlse = torch.randn(lse.shape, generator=g, device=device).masked_fill(empty, 0.0)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    ref_grads = torch.autograd.grad((ref_out, ref_lse), (q64, k64, v64), (dout.double(), dlse.double()))
    errors = {"out": relative_error(out, ref_out), "lse": relative_error(lse, ref_lse)}
    errors.update({f"d{x}": relative_error(a, b) for x, a, b in zip("qkv", grads, ref_grads)})
    bounds = {key: (fwd_tol if key in ("out", "lse") else grad_tol) for key in errors}
    empty_rows_zero = bool((out.detach()[empty] == 0).all())
    finite = all(bool(torch.isfinite(t).all()) for t in (out, *grads))
    passed = empty_rows_zero and finite and all(errors[key] <= bounds[key] for key in errors)
    return {
        "name": name,
        "pattern": repr(pattern),
        "causal": causal,
        "dtype": str(dtype).removeprefix("torch."),
        "n": n,
        "heads": h,
        "empty_rows": int(empty.sum()),
        "errors": errors,
        "bounds": bounds,
        "empty_rows_zero": empty_rows_zero,
        "out_contiguous": out.is_contiguous(),
        "finite": finite,
        "passed": passed,
    }


def correctness(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    bs = args.block_size
    cases = [
        ("union", local_window(100) | dilated_blocks(4, 2, bs) | random_blocks(0.1, 1, bs), True),
        ("dilated_blocks", dilated_blocks(3, 2, bs), False),  # leaves rows with no key
    ]
    dtypes = [torch.bfloat16] + ([torch.float32] if args.check_fp32 else [])
    results = []
    for dtype in dtypes:
        for name, pattern, causal in cases if dtype == torch.bfloat16 else cases[:1]:
            results.append(check_case(name, pattern, causal, dtype, args, device))
            r = results[-1]
            errs = " ".join(f"{key}={val:.1e}" for key, val in r["errors"].items())
            print(
                f"check {name:15s} {r['dtype']:9s} causal={causal!s:5s} {'PASS' if r['passed'] else 'FAIL'}  {errs}"
            )
    return results


def sized_pattern(kind: str, density: float, n: int, block: int) -> tuple[SparsePattern, dict[str, Any]]:
    """A pattern of ``kind`` whose fraction of computed blocks is close to ``density``."""
    nb = -(-n // block)
    if kind == "local_window":
        # Blocks within m of the diagonal are computed: (2m + 1) of nb per block row.
        m = max(0, round((density * nb - 1) / 2))
        return local_window(m * block), {"window": m * block}
    if kind == "random_blocks":
        return random_blocks(density, 0, block), {"density": density, "seed": 0}
    if kind == "dilated_blocks":
        # Dilation 2: each segment of s blocks computes (s/2)^2 of its s^2 pairs: density s / (4 nb).
        segment = min(nb, max(2, round(4 * density * nb)))
        return dilated_blocks(segment, 2, block), {"segment_blocks": segment, "dilation": 2}
    raise ValueError(f"kind={kind!r} must be one of {KINDS}")


def dense_timings(tensors: tuple[torch.Tensor, ...], device: torch.device, budget: float) -> dict[str, Any]:
    q, k, v, dout = tensors
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    _, n, h, d = q.shape
    flops = 4.0 * n * n * h * d
    results: dict[str, Any] = {}
    for name, backend in DENSE_BACKENDS[device.type].items():

        def forward(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)

        def step() -> object:
            return torch.autograd.grad(forward(), (q, k, v), dout)

        try:
            fwd = measure(forward, device, budget)
            bwd = measure(step, device, budget)
        except RuntimeError as exc:  # a backend that does not take this shape on this GPU
            results[name] = {"error": str(exc).splitlines()[0]}
            print(f"dense {name}: {results[name]['error']}")
            continue
        results[name] = {
            "fwd": fwd,
            "fwdbwd": bwd,
            "fwd_tflops": flops / fwd["ms"] / 1e9,
            "fwdbwd_tflops": 3.5 * flops / bwd["ms"] / 1e9,
        }
        print(
            f"dense {name:6s} fwd {fwd['ms']:9.2f} ms  fwd+bwd {bwd['ms']:9.2f} ms  "
            f"({results[name]['fwd_tflops']:.0f} / {results[name]['fwdbwd_tflops']:.0f} TFLOP/s)"
        )
    return results


def sparse_timing(
    kind: str,
    density: float,
    tensors: tuple[torch.Tensor, ...],
    dense_ms: dict[str, float],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    q, k, v, dout = tensors
    _, n, h, d = q.shape
    pattern, params = sized_pattern(kind, density, n, args.block_size)
    t0 = time.perf_counter()
    stats = pattern.stats(n, num_heads=h, block_size=args.block_size, device=device)
    synchronize(device)
    mask_s = time.perf_counter() - t0

    def forward() -> torch.Tensor:
        out = block_sparse_attention(
            q, k, v, pattern, block_size=args.block_size, kernel_options=args.kernel_options
        )
        assert isinstance(out, torch.Tensor)
        return out

    def step() -> object:
        return torch.autograd.grad(forward(), (q, k, v), dout)

    fwd = measure(forward, device, args.budget)
    bwd = measure(step, device, args.budget)
    flops = stats.flops(d)
    # The options the kernels ran with: the caller's, or the package's defaults for this mask.
    mask = block_masks.get(pattern, n, h, block_size=args.block_size, device=device)
    options = args.kernel_options or default_kernel_options(mask, q, args.block_size)
    row: dict[str, Any] = {
        "kind": kind,
        "target_density": density,
        "params": params,
        "pattern": repr(pattern),
        "kernel_options": options,
        "neighbour_share": neighbour_share(mask),
        "density": stats.density,
        "pair_density": stats.pair_density,
        "useful_flops_fwd": flops,
        "mask_and_stats_s": mask_s,
        "fwd": fwd,
        "fwdbwd": bwd,
        "fwd_tflops": flops / fwd["ms"] / 1e9,
        "fwdbwd_tflops": 3.5 * flops / bwd["ms"] / 1e9,
    }
    if "fwd" in dense_ms:
        row["fwd_ratio"] = fwd["ms"] / (dense_ms["fwd"] * stats.density)
        row["fwdbwd_ratio"] = bwd["ms"] / (dense_ms["fwdbwd"] * stats.density)
    return row


def _options_label(options: dict[str, Any] | None) -> str:
    if not options:
        return "FlexAttention's"
    return ", ".join(f"{key}={val}" for key, val in options.items())


def table(rows: list[dict[str, Any]], reference: str) -> str:
    head = (
        f"| pattern | block density | fwd ms | fwd / ({reference} x density) | fwd+bwd ms "
        f"| fwd+bwd / ({reference} x density) | useful TFLOP/s fwd, fwd+bwd | kernel options |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = ", ".join(f"{key}={val}" for key, val in r["params"].items())
        lines.append(
            f"| {r['kind']}({params}) | {r['density']:.2%} | {r['fwd']['ms']:.2f} | {r.get('fwd_ratio', math.nan):.2f} "
            f"| {r['fwdbwd']['ms']:.2f} | {r.get('fwdbwd_ratio', math.nan):.2f} "
            f"| {r['fwd_tflops']:.1f}, {r['fwdbwd_tflops']:.1f} | {_options_label(r.get('kernel_options'))} |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """The ``sparse`` command (arguments parsed by ``dilated_attn_bench.cli``); 1 when a check fails."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device=cuda: no CUDA device is available (use --device cpu for a smoke run)")
    writable_file("--out", args.out)
    if args.md is not None:
        writable_file("--md", args.md)
    dtype = torch.bfloat16
    report: dict[str, Any] = {
        "environment": environment(device),
        "config": {
            "n": args.n,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "batch": 1,
            "dtype": "bfloat16",
            "block_size": args.block_size,
            "causal": False,
            "kernel_options": args.kernel_options,
            "target": TARGET,
            "forward_timed_with_grad_enabled_inputs": True,
        },
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))

    report["check"] = [] if args.skip_check else correctness(args, device)
    save()

    tensors = inputs(args.n, args.heads, args.head_dim, dtype, device, seed=0)
    q, k, v, _ = tensors
    for t in (q, k, v):
        t.requires_grad_()
    report["dense"] = dense_timings(tensors, device, args.budget)
    save()
    reference = next((name for name, r in report["dense"].items() if "error" not in r), None)
    dense_ms = {}
    if reference is not None:
        dense_ms = {
            "fwd": report["dense"][reference]["fwd"]["ms"],
            "fwdbwd": report["dense"][reference]["fwdbwd"]["ms"],
        }
    report["ratio_reference"] = reference

    report["sparse"] = []
    for kind in args.kinds:
        for density in args.densities:
            try:
                row = sparse_timing(kind, density, tensors, dense_ms, args, device)
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                row = {
                    "kind": kind,
                    "target_density": density,
                    "error": f"{type(exc).__name__}: {exc}"[:2000],
                }
                print(f"{kind} {density}: {row['error'][:300]}")
            else:
                print(
                    f"{kind:15s} density {row['density']:7.2%}  fwd {row['fwd']['ms']:8.2f} ms "
                    f"(x{row.get('fwd_ratio', math.nan):.2f})  fwd+bwd {row['fwdbwd']['ms']:8.2f} ms "
                    f"(x{row.get('fwdbwd_ratio', math.nan):.2f})  first call {row['fwdbwd']['first_call_s'] + row['fwd']['first_call_s']:.1f} s"
                )
            report["sparse"].append(row)
            save()

    measured = [r for r in report["sparse"] if "error" not in r]
    report["target_met"] = bool(measured) and all(
        r.get("fwd_ratio", math.inf) <= TARGET and r.get("fwdbwd_ratio", math.inf) <= TARGET for r in measured
    )
    save()
    summary = table(measured, reference or "dense")
    print()
    print(
        f"{report['environment'].get('gpu', device.type)}, bf16, b=1, h={args.heads}, d={args.head_dim}, "
        f"n={args.n}, block {args.block_size}; ratio = time / ({reference} time x block density), target <= {TARGET}"
    )
    print(summary)
    checks_passed = all(r["passed"] for r in report["check"])
    print(f"correctness check: {'passed' if checks_passed else 'FAILED'}; target met: {report['target_met']}")
    if args.md is not None:
        dense_lines = [
            f"- dense {name}: "
            + (
                r["error"]
                if "error" in r
                else f"fwd {r['fwd']['ms']:.1f} ms ({r['fwd_tflops']:.0f} TFLOP/s), "
                f"fwd+bwd {r['fwdbwd']['ms']:.1f} ms ({r['fwdbwd_tflops']:.0f} TFLOP/s)"
            )
            for name, r in report["dense"].items()
        ]
        args.md.write_text(
            "\n".join(
                [
                    f"{report['environment'].get('gpu', device.type)}, torch {torch.__version__}, bf16, b=1, h={args.heads}, "
                    f"d={args.head_dim}, n={args.n}, block {args.block_size}, not causal.",
                    "",
                    *dense_lines,
                    "",
                    summary,
                    "",
                    f"Correctness check at n={args.check_n}: {'passed' if checks_passed else 'FAILED'}.",
                ]
            )
            + "\n"
        )
    return 0 if checks_passed else 1
