"""``kernel``: the Triton kernels against the oracle, the segment ceiling and the gather path, on a GPU.

    dilated-attn-bench kernel --out kernel.json
    dilated-attn-bench kernel --variants --out kernel-variants.json

In one process: autotuning on the ``longnet-1m`` shape, correctness against the float64 oracle at
medium sizes, ``longnet-1m`` (bf16, b=1, n=2^20, h=16, d=64) forward and forward+backward TFLOP/s
(useful FLOPs of SPEC §3) beside the segment ceiling (cuDNN SDPA on ``(n/2048, 16, 2048, 64)``), the
``head_groups`` forward beside the gather+SDPA path, peak memory beyond the inputs, and the longest
sequences that run. Every measurement is guarded: an error or OOM is recorded and the run goes on.
Prints a markdown table; ``--out`` gets every number as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from dilated_attn import DilationPattern, dilated_attention
from dilated_attn.reference import dilated_attention_reference
from dilated_attn.tolerances import TOLERANCES, relative_error
from torch.nn.attention import SDPBackend, sdpa_kernel

from dilated_attn_bench.cli import VARIANT_TILES, UsageError, writable_file
from dilated_attn_bench.timing import time_calls

SEGMENTS = (2048, 4096, 8192, 16384, 32768)
DILATIONS = (1, 2, 4, 8, 16)
HEADS, HEAD_DIM = 16, 64
CEILING_SEGMENT = 2048
MIB = 1 << 20
DEVICE = "cuda"


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _guarded(fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``fn``'s record, or the error it raised (OOM told apart), with memory released either way."""
    try:
        record = fn(*args, **kwargs)
        record.setdefault("status", "ok")
        return record
    except torch.OutOfMemoryError as exc:
        return {"status": "oom", "error": str(exc).splitlines()[0][:300]}
    except Exception as exc:  # a failed measurement must not end the run
        return {
            "status": "error",
            "error": f"{type(exc).__name__}: {exc}"[:500],
            "trace": traceback.format_exc()[-1500:],
        }
    finally:
        _free()


def _time_ms(fn: Callable[[], Any], warmup: int = 2, repeats: int = 5) -> float:
    """Median ms of ``repeats`` calls after ``warmup`` (no time budget: the counts are the study's)."""
    return time_calls(fn, torch.device(DEVICE), warmup=warmup, repeats=repeats, budget_s=None).median_ms


def _inputs(
    n: int, *, grad: bool, heads: int = HEADS, dtype: torch.dtype = torch.bfloat16
) -> list[torch.Tensor]:
    shape = (1, n, heads, HEAD_DIM)
    tensors = [torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(4 if grad else 3)]
    if grad:
        for t in tensors[:3]:
            t.requires_grad_()
    return tensors


def _dilated_closures(
    n: int, mode: str, backend: str, *, grad: bool
) -> tuple[Callable[[], Any], list[torch.Tensor]]:
    tensors = _inputs(n, grad=grad)
    q, k, v = tensors[:3]

    def attend() -> Any:
        return dilated_attention(q, k, v, SEGMENTS, DILATIONS, mode=mode, backend=backend)

    if not grad:

        def forward() -> Any:
            with torch.no_grad():
                return attend()

        return forward, tensors

    def forward_backward() -> Any:
        return torch.autograd.grad(attend(), (q, k, v), tensors[3])

    return forward_backward, tensors


def _useful_flops(n: int, mode: str, backward: bool) -> float:
    return DilationPattern(SEGMENTS, DILATIONS).flops(n, HEADS, HEAD_DIM, mode=mode, backward=backward)


def throughput(n: int, mode: str, backend: str, *, grad: bool) -> dict[str, Any]:
    fn, _ = _dilated_closures(n, mode, backend, grad=grad)
    ms = _time_ms(fn)
    return {"ms": ms, "tflops": _useful_flops(n, mode, grad) / ms / 1e9}


def ceiling(n: int, kernel: SDPBackend, *, grad: bool) -> dict[str, Any]:
    segments = n // CEILING_SEGMENT
    leaves = [
        torch.randn(segments, CEILING_SEGMENT, HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
        for _ in range(4)
    ]
    for t in leaves[:3]:
        t.requires_grad_(grad)
    q, k, v, dout = (t.transpose(1, 2) for t in leaves)

    def attend() -> torch.Tensor:
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(q, k, v)

    if grad:
        ms = _time_ms(lambda: torch.autograd.grad(attend(), leaves[:3], dout))
    else:
        with torch.no_grad():
            ms = _time_ms(attend)
    flops = 4.0 * segments * HEADS * CEILING_SEGMENT**2 * HEAD_DIM * (3.5 if grad else 1.0)
    return {"ms": ms, "tflops": flops / ms / 1e9}


def correctness() -> list[dict[str, Any]]:
    cases = [
        ((1, 4096, 8, 64), (256, 512, 1024, 2048, 4096), DILATIONS, torch.bfloat16),
        ((2, 3001, 6, 64), (256, 512, 1000, 3001), (1, 2, 3, 8), torch.bfloat16),
        ((1, 2047, 4, 128), (512, 2047), (2, 5), torch.float16),
        ((1, 1500, 4, 256), (300, 1500), (1, 4), torch.bfloat16),
        ((1, 1025, 4, 32), (128, 1025), (1, 3), torch.float32),
    ]
    rows = []
    for shape, w, r, dtype in cases:
        for mode in ("longnet", "head_groups"):
            for causal in (False, True):
                label = f"{tuple(shape)} w={w} r={r} {str(dtype).removeprefix('torch.')} {mode}{' causal' if causal else ''}"
                rows.append({"case": label, **_guarded(_check, shape, w, r, dtype, mode, causal)})
    return rows


def _check(
    shape: tuple[int, ...],
    w: tuple[int, ...],
    r: tuple[int, ...],
    dtype: torch.dtype,
    mode: str,
    causal: bool,
) -> dict[str, Any]:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    out, lse = dilated_attention(q, k, v, w, r, mode=mode, causal=causal, return_lse=True, backend="triton")
    grad_out = torch.randn(shape, device=DEVICE, dtype=dtype, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = dilated_attention_reference(q64, k64, v64, w, r, mode=mode, causal=causal, return_lse=True)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    errors = {"out": relative_error(out, ref), "lse": relative_error(lse, ref_lse)}
    errors.update({f"d{name}": relative_error(a, b) for name, a, b in zip("qkv", grads, ref_grads)})
    fwd_tol, grad_tol = TOLERANCES[dtype]
    passed = all(errors[key] <= fwd_tol for key in ("out", "lse")) and all(
        errors[f"d{x}"] <= grad_tol for x in "qkv"
    )
    return {"errors": errors, "passed": passed}


def peak_memory(n: int, *, grad: bool) -> dict[str, Any]:
    """Peak allocation beyond the inputs (and the output gradient) during one call, over the output's size."""
    fn, tensors = _dilated_closures(n, "longnet", "triton", grad=grad)
    fn()  # tuned and compiled outside the measurement
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    del result
    out_bytes = tensors[0].numel() * tensors[0].element_size()
    return {"extra_mib": extra / MIB, "output_mib": out_bytes / MIB, "ratio": extra / out_bytes}


def one_call(n: int, *, grad: bool) -> dict[str, Any]:
    """Seconds and peak memory of the first call at length ``n`` (compilation and tuning included)."""
    fn, _ = _dilated_closures(n, "longnet", "triton", grad=grad)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return {"s": time.perf_counter() - start, "peak_gib": torch.cuda.max_memory_allocated() / (1 << 30)}


def longest(lengths: list[int], *, grad: bool) -> list[dict[str, Any]]:
    """One call at each length in turn, up to the first that fails."""
    rows = []
    for n in lengths:
        record = {"n": n, **_guarded(one_call, n, grad=grad)}
        rows.append(record)
        if record["status"] != "ok":
            break
    return rows


VARIANT_FLAGS = ((), ("USE_TMA",))


def forward_variants(
    n: int, tiles: tuple[tuple[int, int, int, int], ...] = VARIANT_TILES, repeats: int = 10
) -> list[dict[str, Any]]:
    """The ``longnet-1m`` forward under each (flags, tile) variant, each beside a fresh ceiling run.

    Every variant's output is compared with the tuned kernel's (relative error), and each timing is
    bracketed by cuDNN ceiling timings so that drift of the machine shows.
    """
    from dilated_attn.kernels.forward import forward_launch
    from dilated_attn.kernels.launches import plan_launches

    q, k, v = _inputs(n, grad=False)
    plan = plan_launches(n, HEADS, SEGMENTS, DILATIONS, "longnet")
    scale = HEAD_DIM**-0.5
    flops = _useful_flops(n, "longnet", False)

    def run(variant: dict[str, Any] | None) -> torch.Tensor:
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], device=DEVICE, dtype=torch.float32)
        for launch in plan.launches:
            forward_launch(q, k, v, out, lse, launch, causal=False, scale=scale, variant=variant)
        return out

    with torch.no_grad():
        reference = dilated_attention(q, k, v, SEGMENTS, DILATIONS, backend="triton")
    rows = []
    for flags in VARIANT_FLAGS:
        for tile in tiles:
            variant: dict[str, Any] = {"USE_TMA": "USE_TMA" in flags, "config": tile}

            def measure(variant: dict[str, Any] = variant) -> dict[str, Any]:
                error = relative_error(run(variant), reference)
                before = ceiling(n, SDPBackend.CUDNN_ATTENTION, grad=False)
                ms = _time_ms(lambda: run(variant), repeats=repeats)
                after = ceiling(n, SDPBackend.CUDNN_ATTENTION, grad=False)
                ceiling_tflops = (before["tflops"] + after["tflops"]) / 2
                tflops = flops / ms / 1e9
                return {
                    "ms": ms,
                    "tflops": tflops,
                    "ceiling_tflops": ceiling_tflops,
                    "ratio": tflops / ceiling_tflops,
                    "error_vs_tuned": error,
                }

            record = _guarded(measure)
            record.update({"flags": "+".join(flags) or "-", "tile": tile})
            rows.append(record)
            print(
                f"variant {record['flags']:<24} {tile}: {record.get('status')} "
                f"{record.get('ms', float('nan')):.2f} ms ratio {record.get('ratio', float('nan')):.3f} "
                f"err {record.get('error_vs_tuned', float('nan')):.2e} {record.get('error', '')[:200]}",
                flush=True,
            )
    # Forward + backward (tuned), with the backward's tiles read through descriptors or pointers.
    from dilated_attn.kernels.tuning import TMA_ENV

    saved = os.environ.get(TMA_ENV)
    try:
        for setting in ("0", "auto"):
            os.environ[TMA_ENV] = setting
            record = _guarded(throughput, n, "longnet", "triton", grad=True)
            record.update(
                {"flags": f"fwd+bwd, {TMA_ENV}={setting}", "tile": "tuned"},
                ceiling=_guarded(ceiling, n, SDPBackend.CUDNN_ATTENTION, grad=True),
            )
            if record.get("status") == "ok" and record["ceiling"].get("status") == "ok":
                record["ratio"] = record["tflops"] / record["ceiling"]["tflops"]
            rows.append(record)
            print(f"variant {record['flags']}: {record.get('ms')} ms ratio {record.get('ratio')}", flush=True)
    finally:
        if saved is None:
            os.environ.pop(TMA_ENV, None)
        else:
            os.environ[TMA_ENV] = saved
    return rows


def tuned_configs() -> dict[str, Any]:
    """The configurations the autotuner picked, per kernel and tuning key."""
    from dilated_attn.kernels.backward import _dkdv_tuned, _dq_tuned
    from dilated_attn.kernels.forward import _fwd_tuned

    return {
        "configs": {
            name: "; ".join(f"{key}: {cfg}" for key, cfg in kernel.cache.items())
            for name, kernel in (("forward", _fwd_tuned), ("dkdv", _dkdv_tuned), ("dq", _dq_tuned))
        }
    }


def _fmt(record: dict[str, Any], key: str, digits: int = 1) -> str:
    if record.get("status") != "ok":
        return record.get("status", "?")
    return f"{record[key]:.{digits}f}"


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    if a.get("status") == "ok" and b.get("status") == "ok":
        return a["tflops"] / b["tflops"]
    return None


def main(args: argparse.Namespace) -> int:
    """The ``kernel`` command (arguments parsed by ``dilated_attn_bench.cli``)."""
    if not torch.cuda.is_available():
        raise UsageError("needs a CUDA device")
    out = writable_file("--out", args.out)
    if args.variants:
        rows = forward_variants(args.n, tuple(args.variant_tiles))
        with open(out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "variants": rows}, fh, indent=2, default=str)
        return 0
    import triton

    n = args.n
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "n": n,
        "pattern": {
            "segment_lengths": SEGMENTS,
            "dilation_rates": DILATIONS,
            "heads": HEADS,
            "head_dim": HEAD_DIM,
        },
    }

    results["tuning_forward"] = _guarded(one_call, n, grad=False)
    results["tuning_forward_backward"] = _guarded(one_call, n, grad=True)
    results["correctness"] = correctness()
    results["ceiling_cudnn_fwd"] = _guarded(ceiling, n, SDPBackend.CUDNN_ATTENTION, grad=False)
    results["ceiling_cudnn_fwd_bwd"] = _guarded(ceiling, n, SDPBackend.CUDNN_ATTENTION, grad=True)
    results["ceiling_flash_fwd"] = _guarded(ceiling, n, SDPBackend.FLASH_ATTENTION, grad=False)
    results["ceiling_flash_fwd_bwd"] = _guarded(ceiling, n, SDPBackend.FLASH_ATTENTION, grad=True)
    results["triton_fwd"] = _guarded(throughput, n, "longnet", "triton", grad=False)
    results["triton_fwd_bwd"] = _guarded(throughput, n, "longnet", "triton", grad=True)
    results["sdpa_fwd"] = _guarded(throughput, n, "longnet", "sdpa", grad=False)
    results["triton_head_groups_fwd"] = _guarded(throughput, n, "head_groups", "triton", grad=False)
    results["sdpa_head_groups_fwd"] = _guarded(throughput, n, "head_groups", "sdpa", grad=False)
    results["memory_fwd"] = _guarded(peak_memory, n, grad=False)
    results["memory_fwd_bwd"] = _guarded(peak_memory, n, grad=True)
    results["longest_fwd"] = longest(args.longest, grad=False)
    results["longest_fwd_bwd"] = longest(args.longest, grad=True)
    results["tuned_configs"] = _guarded(tuned_configs)
    results["ratios"] = {
        "fwd_vs_ceiling_cudnn": _ratio(results["triton_fwd"], results["ceiling_cudnn_fwd"]),
        "fwd_bwd_vs_ceiling_cudnn": _ratio(results["triton_fwd_bwd"], results["ceiling_cudnn_fwd_bwd"]),
        "fwd_vs_sdpa_gather": _ratio(results["triton_fwd"], results["sdpa_fwd"]),
        "head_groups_fwd_vs_sdpa": _ratio(results["triton_head_groups_fwd"], results["sdpa_head_groups_fwd"]),
    }
    with open(out, "w") as fh:
        json.dump(results, fh, indent=2, default=str)
    _print_table(results)
    return 0 if all(row.get("passed") for row in results["correctness"]) else 1


def _print_table(results: dict[str, Any]) -> None:
    print(
        f"\n{results['device']}, torch {results['torch']}, triton {results['triton']}, {results['date']}, n={results['n']}"
    )
    failed = [row["case"] for row in results["correctness"] if not row.get("passed")]
    print(
        f"correctness vs float64 oracle: {len(results['correctness']) - len(failed)}/{len(results['correctness'])} passed"
    )
    for case in failed:
        print(f"  FAILED {case}")
    print("\n| measurement | ms | TFLOP/s |\n|---|---|---|")
    for key in (
        "ceiling_cudnn_fwd",
        "ceiling_cudnn_fwd_bwd",
        "ceiling_flash_fwd",
        "ceiling_flash_fwd_bwd",
        "triton_fwd",
        "triton_fwd_bwd",
        "sdpa_fwd",
        "triton_head_groups_fwd",
        "sdpa_head_groups_fwd",
    ):
        record = results[key]
        print(f"| {key} | {_fmt(record, 'ms', 2)} | {_fmt(record, 'tflops')} |")
    print("\n| ratio | value | target |\n|---|---|---|")
    targets = {
        "fwd_vs_ceiling_cudnn": ">= 0.85",
        "fwd_bwd_vs_ceiling_cudnn": ">= 0.70",
        "head_groups_fwd_vs_sdpa": ">= 1.3",
    }
    for key, value in results["ratios"].items():
        print(f"| {key} | {'n/a' if value is None else f'{value:.3f}'} | {targets.get(key, '')} |")
    print("\n| memory beyond inputs | MiB | x output | target |\n|---|---|---|---|")
    for key in ("memory_fwd", "memory_fwd_bwd"):
        record = results[key]
        print(
            f"| {key} | {_fmt(record, 'extra_mib', 0)} | {_fmt(record, 'ratio', 3)} | {'<= 1.5' if key == 'memory_fwd' else ''} |"
        )
    print("\n| longest runs | n | s | peak GiB | status |\n|---|---|---|---|---|")
    for key in ("longest_fwd", "longest_fwd_bwd"):
        for row in results[key]:
            print(
                f"| {key} | {row['n']} | {_fmt(row, 's', 2)} | {_fmt(row, 'peak_gib', 1)} | {row['status']} |"
            )
    configs = results["tuned_configs"].get("configs", {})
    for name, text in configs.items():
        print(f"tuned {name}: {text}")
