"""``kernel``: the Triton kernels against the oracle, the segment ceiling and the gather path, on a GPU.

    dilated-attn-bench kernel --out kernel.json
    dilated-attn-bench kernel --variants --out kernel-variants.json
    dilated-attn-bench kernel --backward-variants --out kernel-backward-variants.json

In one process: autotuning on the ``longnet-1m`` shape, correctness against the float64 oracle at
medium sizes, ``longnet-1m`` (bf16, b=1, n=2^20, h=16, d=64) forward and forward+backward TFLOP/s
(useful FLOPs of SPEC §3) beside the segment ceiling (cuDNN SDPA on ``(n/2048, 16, 2048, 64)``), the
``head_groups`` forward beside the gather+SDPA path, peak memory beyond the inputs, and the longest
sequences that run. Every measurement is guarded: an error or OOM is recorded and the run goes on.
Prints a markdown table; ``--out`` gets every number as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from dilated_attn import DilationPattern, dilated_attention
from dilated_attn.reference import dilated_attention_reference
from dilated_attn.tolerances import TOLERANCES, relative_error
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

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
    n: int, *, grad: bool, heads: int = HEADS, dtype: torch.dtype = torch.bfloat16, head_dim: int = HEAD_DIM
) -> list[torch.Tensor]:
    shape = (1, n, heads, head_dim)
    tensors = [torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(4 if grad else 3)]
    if grad:
        for t in tensors[:3]:
            t.requires_grad_()
    return tensors


def _dilated_closures(
    n: int,
    mode: str,
    backend: str,
    *,
    grad: bool,
    causal: bool = False,
    heads: int = HEADS,
    head_dim: int = HEAD_DIM,
) -> tuple[Callable[[], Any], list[torch.Tensor]]:
    tensors = _inputs(n, grad=grad, heads=heads, head_dim=head_dim)
    q, k, v = tensors[:3]

    def attend() -> Any:
        return dilated_attention(q, k, v, SEGMENTS, DILATIONS, mode=mode, causal=causal, backend=backend)

    if not grad:

        def forward() -> Any:
            with torch.no_grad():
                return attend()

        return forward, tensors

    def forward_backward() -> Any:
        return torch.autograd.grad(attend(), (q, k, v), tensors[3])

    return forward_backward, tensors


def _useful_flops(
    n: int, mode: str, backward: bool, *, causal: bool = False, heads: int = HEADS, head_dim: int = HEAD_DIM
) -> float:
    return DilationPattern(SEGMENTS, DILATIONS).flops(
        n, heads, head_dim, mode=mode, backward=backward, causal=causal
    )


def throughput(
    n: int,
    mode: str,
    backend: str,
    *,
    grad: bool,
    causal: bool = False,
    heads: int = HEADS,
    head_dim: int = HEAD_DIM,
) -> dict[str, Any]:
    fn, _ = _dilated_closures(n, mode, backend, grad=grad, causal=causal, heads=heads, head_dim=head_dim)
    ms = _time_ms(fn)
    flops = _useful_flops(n, mode, grad, causal=causal, heads=heads, head_dim=head_dim)
    return {"ms": ms, "tflops": flops / ms / 1e9}


def ceiling(
    n: int,
    kernel: SDPBackend,
    *,
    grad: bool,
    causal: bool = False,
    heads: int = HEADS,
    head_dim: int = HEAD_DIM,
) -> dict[str, Any]:
    """cuDNN (or flash) SDPA on independent ``CEILING_SEGMENT``-token segments: the work of one pattern
    with ``r = 1`` at full speed, which no dilated kernel can beat per useful FLOP."""
    segments = n // CEILING_SEGMENT
    leaves = [
        torch.randn(segments, CEILING_SEGMENT, heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
        for _ in range(4)
    ]
    for t in leaves[:3]:
        t.requires_grad_(grad)
    q, k, v, dout = (t.transpose(1, 2) for t in leaves)

    def attend() -> torch.Tensor:
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    if grad:
        ms = _time_ms(lambda: torch.autograd.grad(attend(), leaves[:3], dout))
    else:
        with torch.no_grad():
            ms = _time_ms(attend)
    flops = 4.0 * segments * heads * CEILING_SEGMENT**2 * head_dim * (3.5 if grad else 1.0)
    if causal:
        flops /= 2  # halved, as DilationPattern.flops counts the dilated side
    return {"ms": ms, "tflops": flops / ms / 1e9}


def correctness() -> list[dict[str, Any]]:
    """Forward, LSE and gradients against the float64 oracle: odd lengths, r not dividing w, both
    modes, causal and not, fp16/bf16/fp32, d = 32/64/128/256, the backward's dQ in several passes."""
    cases = [
        ((1, 4096, 8, 64), (256, 512, 1024, 2048, 4096), DILATIONS, torch.bfloat16),
        ((2, 3001, 6, 64), (256, 512, 1000, 3001), (1, 2, 3, 8), torch.bfloat16),
        ((1, 1999, 4, 64), (300, 1999), (1, 3), torch.float16),
        ((1, 2047, 4, 128), (512, 2047), (2, 5), torch.float16),
        ((1, 2049, 8, 128), (512, 2049), (1, 3), torch.bfloat16),
        ((1, 777, 4, 128), (100, 777), (1, 3), torch.float32),
        ((1, 1500, 4, 256), (300, 1500), (1, 4), torch.bfloat16),
        ((1, 1025, 4, 32), (128, 1025), (1, 3), torch.float32),
        ((1, 1537, 4, 32), (512, 1537), (1, 5), torch.bfloat16),
        # past 8K (with dQ reductions, below: five accumulator passes of 2048 tokens)
        ((1, 8195, 4, 64), (256, 1024), (1, 3), torch.bfloat16),
    ]
    checks = []  # (label, arguments of _check, dQ by tile reductions)
    for shape, w, r, dtype in cases:
        for mode in ("longnet", "head_groups"):
            for causal in (False, True):
                label = f"{tuple(shape)} w={w} r={r} {str(dtype).removeprefix('torch.')} {mode}{' causal' if causal else ''}"
                checks.append((label, (shape, w, r, dtype, mode, causal), False))
    # dQ by tile reductions (opt in) over several accumulator passes, also at d = 128, fp16, batch 2: a
    # Triton backward, so with the segment engine off (it would take these 16-bit backwards)
    for shape, w, r, dtype in (
        ((1, 8195, 4, 64), (256, 1024), (1, 3), torch.bfloat16),
        ((2, 4099, 4, 128), (256, 512, 1024), (1, 3, 4), torch.float16),
    ):
        for causal in (False, True):
            label = f"{tuple(shape)} w={w} r={r} {str(dtype).removeprefix('torch.')} dQ reductions{' causal' if causal else ''}"
            checks.append((label, (shape, w, r, dtype, "longnet", causal), True))
    from dilated_attn.kernels.backward import DQ_ENV
    from dilated_attn.kernels.segments import ENGINE_ENV

    saved = {name: os.environ.get(name) for name in (DQ_ENV, ENGINE_ENV)}

    def setting(values: dict[str, str | None]) -> None:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    rows = []
    try:
        for label, arguments, reductions in tqdm(checks, desc="correctness", unit="case"):
            setting({DQ_ENV: "atomic", ENGINE_ENV: "triton"} if reductions else saved)
            rows.append({"case": label, **_guarded(_check, *arguments)})
    finally:
        setting(saved)
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
    """Peak allocation during one call beyond the inputs (and the output gradient), over the output's
    size; with ``grad`` also beyond the inputs' gradients (which any backward must return)."""
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
    record = {"extra_mib": extra / MIB, "output_mib": out_bytes / MIB, "ratio": extra / out_bytes}
    if grad:
        grads = sum(t.numel() * t.element_size() for t in tensors[:3])
        record["beyond_grads_mib"] = (extra - grads) / MIB
        record["beyond_grads_ratio"] = (extra - grads) / out_bytes
    return record


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


# Backward variants: (DILATED_ATTN_TRITON_DQ, LSE and D head-major in the backward).
BACKWARD_VARIANTS = (("recompute", True), ("recompute", False), ("atomic", True), ("atomic", False))


def _variant_name(dq: str, head_major: bool) -> str:
    return f"dQ {'reductions' if dq == 'atomic' else 'recomputed'}, LSE {'head-major' if head_major else '(b, n, h)'}"


def backward_variants(n: int, runs: int) -> dict[str, Any]:
    """Forward+backward of every full-length target row under each backward variant (dQ recomputed
    or by tile reductions; LSE and D head-major or not), each ratio against a ceiling timed in the same
    run, ``runs`` times; the autotuner's timing of every backward tile it tried (first launch, ms)."""
    from dilated_attn.kernels import backward

    saved = (os.environ.get(backward.DQ_ENV), backward.HEAD_MAJOR_STATS)
    rows = [row for row in TARGET_ROWS if row[5] == 1]
    results: dict[str, Any] = {"rows": {}, "tile_timings": {}}
    progress = tqdm(total=len(rows) * runs * len(BACKWARD_VARIANTS), desc="backward variants", unit="call")
    try:
        for label, mode, causal, heads, head_dim, *_ in rows:
            shape = {"causal": causal, "heads": heads, "head_dim": head_dim}
            row: dict[str, Any] = {"runs": []}
            for _ in range(runs):
                run: dict[str, Any] = {
                    "ceiling": _guarded(ceiling, n, SDPBackend.CUDNN_ATTENTION, grad=True, **shape)
                }
                for dq, head_major in BACKWARD_VARIANTS:
                    os.environ[backward.DQ_ENV] = dq
                    backward.HEAD_MAJOR_STATS = head_major
                    record = _guarded(throughput, n, mode, "triton", grad=True, **shape)
                    record["ratio"] = _ratio(record, run["ceiling"])
                    run[_variant_name(dq, head_major)] = record
                    for name, kernel in (("dkdv", backward._dkdv_tuned), ("dq", backward._dq_tuned)):
                        timings = getattr(kernel, "configs_timings", None)
                        if timings:
                            results["tile_timings"][f"{label}, dQ {dq}, {name}"] = {
                                str(config): value for config, value in timings.items()
                            }
                            kernel.configs_timings = None
                    progress.update()
                row["runs"].append(run)
            row["ratios"] = {
                _variant_name(*v): _median([r[_variant_name(*v)]["ratio"] for r in row["runs"]])
                for v in BACKWARD_VARIANTS
            }
            results["rows"][label] = row
    finally:
        progress.close()
        if saved[0] is None:
            os.environ.pop(backward.DQ_ENV, None)
        else:
            os.environ[backward.DQ_ENV] = saved[0]
        backward.HEAD_MAJOR_STATS = saved[1]
    return results


def print_backward_variants(results: dict[str, Any]) -> None:
    names = [_variant_name(*v) for v in BACKWARD_VARIANTS]
    print("\n| row (fwd+bwd / ceiling) | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for label, row in results["rows"].items():
        print(f"| {label} | " + " | ".join(_num(row["ratios"][name]) for name in names) + " |")


# The fused-kernel issue's rows: (label, mode, causal, heads, head_dim, n divisor, forward target,
# forward+backward target), each a ratio of useful TFLOP/s to the cuDNN segment ceiling of the same
# heads, head_dim and causality. The short row has no targets of its own: it must stay within
# SHORT_TOLERANCE of the first row's ratios.
TARGET_ROWS: tuple[tuple[str, str, bool, int, int, int, float | None, float | None], ...] = (
    ("exact", "longnet", False, 16, 64, 1, 0.95, 0.85),
    ("exact causal", "longnet", True, 16, 64, 1, 0.90, 0.82),
    ("head_groups", "head_groups", False, 16, 64, 1, 0.95, 0.85),
    ("head_groups causal", "head_groups", True, 16, 64, 1, 0.90, 0.82),
    ("exact d=128, 8 heads", "longnet", False, 8, 128, 1, 0.90, 0.80),
    ("exact, n/4", "longnet", False, 16, 64, 4, None, None),
)
SHORT_TOLERANCE = 0.03
HEAD_GROUPS_VS_GATHER = (1.5, 3.0)
DETERMINISTIC_SLOWDOWN = 1.15


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def target_rows(n: int, runs: int) -> dict[str, Any]:
    """Every row of the fused-kernel targets, ``runs`` times, each ratio against a ceiling timed beside it."""
    rows: dict[str, Any] = {}
    progress = tqdm(total=len(TARGET_ROWS) * runs, desc="target rows", unit="run")
    for label, mode, causal, heads, head_dim, divisor, fwd_target, bwd_target in TARGET_ROWS:
        length = n // divisor
        shape = {"causal": causal, "heads": heads, "head_dim": head_dim}
        row: dict[str, Any] = {
            "n": length,
            "mode": mode,
            **shape,
            "targets": [fwd_target, bwd_target],
            "runs": [],
        }
        for _ in range(runs):
            run: dict[str, Any] = {
                "ceiling_fwd": _guarded(ceiling, length, SDPBackend.CUDNN_ATTENTION, grad=False, **shape),
                "ceiling_fwd_bwd": _guarded(ceiling, length, SDPBackend.CUDNN_ATTENTION, grad=True, **shape),
                "fwd": _guarded(throughput, length, mode, "triton", grad=False, **shape),
                "fwd_bwd": _guarded(throughput, length, mode, "triton", grad=True, **shape),
            }
            run["ratio_fwd"] = _ratio(run["fwd"], run["ceiling_fwd"])
            run["ratio_fwd_bwd"] = _ratio(run["fwd_bwd"], run["ceiling_fwd_bwd"])
            row["runs"].append(run)
            progress.update()
        for key in ("ratio_fwd", "ratio_fwd_bwd"):
            row[key] = _median([r[key] for r in row["runs"]])
        rows[label] = row
    progress.close()
    return rows


def comparisons(n: int, runs: int) -> dict[str, Any]:
    """head_groups against the gather+SDPA path, the backward under ``torch.use_deterministic_algorithms``
    against the default, ``runs`` times each; memory of forward+backward beyond the inputs and gradients."""
    progress = tqdm(total=runs, desc="comparisons", unit="run")
    extra: dict[str, Any] = {"head_groups_vs_gather": [], "deterministic": []}
    for _ in range(runs):
        ours_fwd = _guarded(throughput, n, "head_groups", "triton", grad=False)
        ours_bwd = _guarded(throughput, n, "head_groups", "triton", grad=True)
        gather_fwd = _guarded(throughput, n, "head_groups", "sdpa", grad=False)
        gather_bwd = _guarded(throughput, n, "head_groups", "sdpa", grad=True)
        extra["head_groups_vs_gather"].append(
            {"fwd": _ratio(ours_fwd, gather_fwd), "fwd_bwd": _ratio(ours_bwd, gather_bwd),
             "gather_fwd": gather_fwd, "gather_fwd_bwd": gather_bwd}
        )  # fmt: skip
        fast = _guarded(throughput, n, "longnet", "triton", grad=True)
        with _deterministic():
            det = _guarded(throughput, n, "longnet", "triton", grad=True)
        slowdown = det["ms"] / fast["ms"] if "ms" in det and "ms" in fast else None
        extra["deterministic"].append({"default": fast, "deterministic": det, "slowdown": slowdown})
        progress.update()
    extra["head_groups_fwd_vs_gather"] = _median([x["fwd"] for x in extra["head_groups_vs_gather"]])
    extra["head_groups_fwd_bwd_vs_gather"] = _median([x["fwd_bwd"] for x in extra["head_groups_vs_gather"]])
    extra["deterministic_slowdown"] = _median([x["slowdown"] for x in extra["deterministic"]])
    extra["memory_fwd_bwd"] = _guarded(peak_memory, n, grad=True)
    progress.close()
    return extra


def _median(values: list[float | None]) -> float | None:
    """The median of the runs (the mean of the middle two for an even count); None if any failed."""
    if not values or any(v is None for v in values):
        return None
    return float(statistics.median(v for v in values if v is not None))


def _verdict(value: float | None, target: float | None, *, at_most: bool = False, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if target is None:
        return f"{value:.3f}{unit}"
    ok = value <= target if at_most else value >= target
    return f"{value:.3f}{unit} ({'<=' if at_most else '>='} {target:g}{unit}: {'met' if ok else 'MISSED'})"


def print_targets(rows: dict[str, Any]) -> None:
    print("\n| row | fwd / ceiling | fwd+bwd / ceiling | runs (fwd, fwd+bwd) |\n|---|---|---|---|")
    first = next(iter(rows.values()))
    for label, row in rows.items():
        fwd_t, bwd_t = row["targets"]
        cells = [_verdict(row["ratio_fwd"], fwd_t), _verdict(row["ratio_fwd_bwd"], bwd_t)]
        if fwd_t is None:
            # No targets of its own: at most SHORT_TOLERANCE below the first row's ratios (a shorter
            # call must not lose to launch overhead; doing better is fine).
            for i, key in enumerate(("ratio_fwd", "ratio_fwd_bwd")):
                if row[key] is not None and first[key] is not None:
                    gap = first[key] - row[key]
                    verdict = "met" if gap <= SHORT_TOLERANCE else "MISSED"
                    cells[i] = (
                        f"{row[key]:.3f} (below the first row by {gap:.3f} <= {SHORT_TOLERANCE}: {verdict})"
                    )
        runs = "; ".join(f"{_num(r['ratio_fwd'])}, {_num(r['ratio_fwd_bwd'])}" for r in row["runs"])
        print(f"| {label} (n={row['n']}) | {cells[0]} | {cells[1]} | {runs} |")


def print_comparisons(targets: dict[str, Any]) -> None:
    fwd_goal, bwd_goal = HEAD_GROUPS_VS_GATHER
    print(
        f"\nhead_groups / gather+SDPA head_groups: fwd {_verdict(targets['head_groups_fwd_vs_gather'], fwd_goal)}, "
        f"fwd+bwd {_verdict(targets['head_groups_fwd_bwd_vs_gather'], bwd_goal)}"
    )
    print(
        "fwd+bwd under torch.use_deterministic_algorithms / default (deterministic: the Triton backward; the "
        "default: cuDNN's on the segment engine, or with --engine triton the same Triton one): "
        + _verdict(targets["deterministic_slowdown"], DETERMINISTIC_SLOWDOWN, at_most=True)
    )
    record = targets["memory_fwd_bwd"]
    print(
        "fwd+bwd memory beyond inputs and gradients: "
        + (
            f"{record['beyond_grads_mib']:.0f} MiB, "
            + _verdict(record["beyond_grads_ratio"], 1.5, at_most=True, unit="x the output")
            if record.get("status") == "ok"
            else record.get("status", "?")
        )
    )


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


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
    if a.get("status") == "ok" and b.get("status") == "ok" and b["tflops"] > 0:
        return a["tflops"] / b["tflops"]
    return None


def main(args: argparse.Namespace) -> int:
    """The ``kernel`` command (arguments parsed by ``dilated_attn_bench.cli``)."""
    out = writable_file("--out", args.out)
    # Every row, the n/4 one included, must hold whole ceiling segments.
    step = max(divisor for *_, divisor, _, _ in TARGET_ROWS) * CEILING_SEGMENT
    if args.n % step:
        raise UsageError(
            f"--n={args.n} must be a multiple of {step} (the n/4 row's ceiling runs {CEILING_SEGMENT}-token segments)"
        )
    if not torch.cuda.is_available():
        raise UsageError("needs a CUDA device")
    from dilated_attn.kernels.segments import ENGINE_ENV

    os.environ[ENGINE_ENV] = args.engine
    if args.variants:
        rows = forward_variants(args.n, tuple(args.variant_tiles))
        with open(out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "variants": rows}, fh, indent=2, default=str)
        return 0
    if args.backward_variants:
        study = backward_variants(args.n, args.runs)
        with open(out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), **study}, fh, indent=2, default=str)
        print_backward_variants(study)
        return 0
    import triton

    n = args.n
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "engine": args.engine,
        "n": n,
        "pattern": {
            "segment_lengths": SEGMENTS,
            "dilation_rates": DILATIONS,
            "heads": HEADS,
            "head_dim": HEAD_DIM,
        },
    }

    def save() -> None:
        """Written after every section, so that a run stopped part-way keeps what it measured."""
        with open(out, "w") as fh:
            json.dump(results, fh, indent=2, default=str)

    sections = set(args.sections)
    results["tuning_forward"] = _guarded(one_call, n, grad=False)
    results["tuning_forward_backward"] = _guarded(one_call, n, grad=True)
    save()
    if "correctness" in sections:
        results["correctness"] = correctness()
        save()
    if "targets" in sections:
        results["targets"] = target_rows(n, args.runs)
        save()
    if "comparisons" in sections:
        results["comparisons"] = comparisons(n, args.runs)
        results["sdpa_fwd"] = _guarded(throughput, n, "longnet", "sdpa", grad=False)
        results["exact_fwd"] = _guarded(throughput, n, "longnet", "triton", grad=False)
        results["memory_fwd"] = _guarded(peak_memory, n, grad=False)
        save()
    if "longest" in sections:
        results["longest_fwd"] = longest(args.longest, grad=False)
        results["longest_fwd_bwd"] = longest(args.longest, grad=True)
        save()
    results["tuned_configs"] = _guarded(tuned_configs)
    save()
    _print_table(results)
    return 0 if all(row.get("passed") for row in results.get("correctness", [])) else 1


def _print_table(results: dict[str, Any]) -> None:
    print(
        f"\n{results['device']}, torch {results['torch']}, triton {results['triton']}, engine {results.get('engine', 'auto')}, "
        f"{results['date']}, n={results['n']}"
    )
    if "correctness" in results:
        failed = [row["case"] for row in results["correctness"] if not row.get("passed")]
        print(
            f"correctness vs float64 oracle: {len(results['correctness']) - len(failed)}/"
            f"{len(results['correctness'])} passed"
        )
        for case in failed:
            print(f"  FAILED {case}")
    if "targets" in results:
        print_targets(results["targets"])
    if "comparisons" in results:
        print_comparisons(results["comparisons"])
        print(
            f"exact forward / gather+SDPA exact forward: {_num(_ratio(results['exact_fwd'], results['sdpa_fwd']))}"
        )
        record = results["memory_fwd"]
        print(
            "forward memory beyond inputs: "
            + (
                f"{record['extra_mib']:.0f} MiB, "
                + _verdict(record["ratio"], 1.5, at_most=True, unit="x the output")
                if record.get("status") == "ok"
                else record.get("status", "?")
            )
        )
    if "longest_fwd" in results:
        print("\n| longest runs | n | s | peak GiB | status |\n|---|---|---|---|---|")
        for key in ("longest_fwd", "longest_fwd_bwd"):
            for row in results[key]:
                print(
                    f"| {key} | {row['n']} | {_fmt(row, 's', 2)} | {_fmt(row, 'peak_gib', 1)} | {row['status']} |"
                )
        longest_bwd = max(
            (row["n"] for row in results["longest_fwd_bwd"] if row["status"] == "ok"), default=0
        )
        print(
            f"longest fwd+bwd: {longest_bwd} tokens ({'met' if longest_bwd >= 8 << 20 else 'MISSED'}: >= 8M)"
        )
    configs = results["tuned_configs"].get("configs", {})
    for name, text in configs.items():
        print(f"tuned {name}: {text}")
