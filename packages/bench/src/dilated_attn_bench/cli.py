"""``dilated-attn-bench``: parses first, then imports torch and the one command that runs.

Commands: ``run`` (the report), ``compare`` (two runs), ``pool`` (buffer pools), ``kernel`` and
``compile-check`` (the Triton kernels), ``sparse`` and ``flex-tuning`` (block-sparse attention),
``ring`` (ring attention over GPUs, under ``torchrun``), ``decode`` (a cached decode step against dense
decoding). Every argument is checked here or where the
command starts, before anything is measured: a bad one ends the command with one line
``dilated-attn-bench <command>: error: ...`` and exit status 2, as argparse does.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from dilated_attn_bench.choices import (
    CPU_DEFAULT_PRESETS,
    DTYPE_NAMES,
    FLEX_TUNING_KINDS,
    GPU_DEFAULT_PRESETS,
    MODES,
    PRESET_NAMES,
    SPARSE_KINDS,
)

PROG = "dilated-attn-bench"
DENSE_MAX_SEQ = 262_144
# The kernel study's default tiles for --variants: BLOCK_M, BLOCK_N, warps, stages.
VARIANT_TILES = ((128, 64, 8, 4), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3))


class UsageError(Exception):
    """A bad argument found once the command has started: reported as argparse reports its own."""


# -- argument types: each names the value and the rule ------------------------------------------------


def _number(kind: type[int] | type[float], text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite {kind.__name__}")
    return value


def positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> int | float:
        value = _number(kind, text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be a positive {kind.__name__}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def non_negative(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> int | float:
        value = _number(kind, text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be a {kind.__name__} >= 0")
        return value

    parse.__name__ = f"non-negative {kind.__name__}"
    return parse


KERNEL_SECTIONS = ("correctness", "targets", "comparisons", "longest")


def kernel_sections(text: str) -> list[str]:
    """Comma-separated names of the kernel study's sections, each one of ``KERNEL_SECTIONS``."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [name for name in names if name not in KERNEL_SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: sections must be a non-empty comma-separated list of {', '.join(KERNEL_SECTIONS)}"
        )
    return names


def token_counts(text: str) -> list[int]:
    """Comma-separated positive token counts, each an integer with an optional K (2**10) or M (2**20)."""
    counts = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        scale = {"K": 1 << 10, "M": 1 << 20}.get(part[-1].upper(), 1)
        digits = part[:-1] if scale > 1 else part
        if not digits.isdigit() or int(digits) == 0:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not a positive token count (an integer, optionally suffixed K or M)"
            )
        counts.append(int(digits) * scale)
    return counts


def fraction(text: str) -> float:
    """A relative change in [0, 1)."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1)")
    return value


def _list(item: Callable[[str], Any], example: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{text!r} is empty; expected e.g. {example}")
        try:
            return [item(part) for part in parts]
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    parse.__name__ = "list"
    return parse


positive_ints = _list(positive(int), "2048,4096")


def densities(text: str) -> list[float]:
    values = _list(positive(float), "0.01,0.05")(text)
    if any(v > 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: block densities must be in (0, 1]")
    return values


def names(text: str) -> list[str]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing")
    return parts


def one_of(known: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        chosen = names(text)
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: not {what}; known: {', '.join(known)}")
        return chosen

    parse.__name__ = what
    return parse


def tiles(text: str) -> list[tuple[int, int, int, int]]:
    """``'128,64,8,4;128,128,8,3'``: tiles of four positive ints (BLOCK_M, BLOCK_N, warps, stages)."""
    out = []
    for group in (g for g in text.split(";") if g.strip()):
        values = _list(positive(int), "128,64,8,4")(group)
        if len(values) != 4:
            raise argparse.ArgumentTypeError(f"{group!r} must be BLOCK_M,BLOCK_N,warps,stages (4 ints)")
        out.append((values[0], values[1], values[2], values[3]))
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r} names no tile")
    return out


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} must be a JSON object")
    return value


def json_objects(text: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({exc.msg})") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a JSON list of objects")
    return value


# -- paths: checked before anything is measured ---------------------------------------------------------


def _probe(flag: str, folder: Path) -> None:
    # A file actually created, not os.access: that answers yes to root on a read-only mount.
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise UsageError(f"{flag}={str(folder)!r}: cannot write there ({exc.strerror or exc})") from None


def writable_dir(flag: str, path: Path) -> Path:
    """``path``, created if needed, once a file could be written into it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag}={str(path)!r}: cannot create the folder ({exc.strerror or exc})") from None
    _probe(flag, path)
    return path


def writable_file(flag: str, path: Path) -> Path:
    """``path``, once it is no folder and a file could be written beside it (its folder is created)."""
    if path.is_dir():
        raise UsageError(f"{flag}={str(path)!r} is a folder; give a file name")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag}={str(path)!r}: cannot create its folder ({exc.strerror or exc})") from None
    _probe(flag, parent)
    return path


# -- the parser ------------------------------------------------------------------------------------------


def _run_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="time, memory, TFLOP/s and correctness; writes a report folder")
    p.add_argument(
        "--preset",
        type=one_of(PRESET_NAMES, "a preset"),
        action="extend",
        help=f"one or more of {', '.join(PRESET_NAMES)} (default: {', '.join(GPU_DEFAULT_PRESETS)} on a "
        f"GPU, {', '.join(CPU_DEFAULT_PRESETS)} on a CPU)",
    )
    p.add_argument(
        "--batch", type=positive_ints, help="batch sizes, comma-separated (overrides the preset's)"
    )
    p.add_argument("--seq", type=positive_ints, help="sequence lengths, comma-separated")
    p.add_argument("--heads", type=positive(int))
    p.add_argument("--dim", type=positive(int), help="head dimension")
    p.add_argument("--segments", type=positive_ints, help="segment lengths, comma-separated")
    p.add_argument("--dilations", type=positive_ints, help="dilation rates, comma-separated")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES))
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--backends", type=names, help="implementations to run: names or globs, e.g. 'sdpa,dense-*'"
    )
    p.add_argument(
        "--exclude",
        type=names,
        help="implementations not to run, e.g. 'reference' (the O(h n^2) float64 oracle) at long lengths",
    )
    p.add_argument("--repeats", type=positive(int), help="timed calls per phase, at most")
    p.add_argument("--warmup", type=positive(int), help="untimed calls before timing")
    p.add_argument("--phase-budget", type=positive(float), help="seconds of timed calls a phase aims for")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument(
        "--dense-max-seq",
        type=positive(int),
        default=DENSE_MAX_SEQ,
        help="skip dense baselines past this length (default %(default)s)",
    )
    p.add_argument("--commit", help="the commit to report where the working directory is no git checkout")
    p.add_argument("--output", type=Path, help="report folder (default bench-results/<date>-<commit>)")
    p.set_defaults(command="dilated_attn_bench.commands:run_command")


def _compare_parser(sub: Any) -> None:
    c = sub.add_parser(
        "compare",
        help="speedups and regressions of run B over run A; exit status 1 on a regression",
        description="Speedups and regressions of run B over run A. A row is slower only past the "
        "threshold and past both runs' measured p10-p90 spread; the exit status is 1 when some row "
        "regressed (slower, mixed, or failing in B only), so that it can gate.",
    )
    c.add_argument("a", type=Path, help="results.json of the baseline run")
    c.add_argument("b", type=Path, help="results.json of the new run")
    c.add_argument(
        "--threshold",
        type=fraction,
        default=0.05,
        help="relative change read as noise, in [0, 1) (default %(default)s)",
    )
    c.set_defaults(command="dilated_attn_bench.commands:compare_command")


def _pool_parser(sub: Any) -> None:
    q = sub.add_parser(
        "pool", help="buffer pools: acquire/release cost, memory report, raw ledgers, attention with a pool"
    )
    q.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    q.add_argument("--out", type=Path, help="also write every number as JSON here")
    q.add_argument(
        "--budget-mb",
        type=positive(float),
        default=64.0,
        help="each pool's budget_bytes in MB for the replay (default %(default)s: the replay evicts)",
    )
    q.add_argument(
        "--seq",
        type=positive_ints,
        default=[1024, 1536, 2048, 3072, 4096],
        help="workspace lengths of the replayed workload",
    )
    q.add_argument("--heads", type=positive(int), default=16)
    q.add_argument("--dim", type=positive(int), default=64)
    q.add_argument("--pairs", type=positive(int), default=2000, help="acquire/release pairs per timed round")
    q.add_argument("--repeats", type=positive(int), default=7, help="timed rounds per measurement (median)")
    q.add_argument("--steps", type=positive(int), default=200, help="acquires in the replayed workload")
    q.add_argument(
        "--held", type=positive(int), default=4, help="leases held at once in the replayed workload"
    )
    q.add_argument("--no-attention", action="store_true", help="leave out the attention forwards")
    q.add_argument(
        "--backend",
        default="sdpa",
        help="attention backend; it must take a pool (capability pool=True), which 'auto' may not pick",
    )
    q.add_argument(
        "--calls", type=positive(int), help="forwards per attention round (default 40 GPU, 15 CPU)"
    )
    q.add_argument(
        "--attention-budget-mb",
        type=positive(float),
        default=512.0,
        help="budget_bytes of the attention pools in MB (default %(default)s)",
    )
    q.set_defaults(command="dilated_attn_bench.commands:pool_command", calls=0)


def _kernel_parser(sub: Any) -> None:
    k = sub.add_parser(
        "kernel",
        help="the fused backend on a GPU: correctness, TFLOP/s beside the segment ceiling, memory, longest runs",
        description="In one process: autotuning on the longnet-1m shape, correctness against the float64 "
        "oracle at medium sizes, then every target row --runs times: longnet-1m "
        "(bf16, b=1, n=2^20, h=16, d=64) exact and head_groups, causal and not, d=128 with 8 heads, and "
        "n/4, forward and forward+backward TFLOP/s over the cuDNN segment ceiling of the same shape "
        "(SDPA on (n/2048, h, 2048, d)); head_groups against the gather+SDPA path; the deterministic "
        "backward against the default; memory beyond the inputs and gradients; the longest sequences "
        "that run. Prints markdown tables with each target; --out gets every number as JSON. Needs CUDA "
        "and Triton.",
    )
    k.add_argument("--out", type=Path, required=True, help="path of the JSON results")
    k.add_argument("--n", type=positive(int), default=1 << 20, help="sequence length of the throughput runs")
    k.add_argument("--runs", type=positive(int), default=3, help="runs of every target row (median reported)")
    k.add_argument(
        "--sections",
        type=kernel_sections,
        default=list(KERNEL_SECTIONS),
        help=f"comma-separated parts to run, of {','.join(KERNEL_SECTIONS)} (default all; the whole run "
        "takes over 10 minutes on an H200, so split it where a job has a time limit)",
    )
    k.add_argument(
        "--engine",
        choices=("auto", "triton"),
        default="auto",
        help="segment attention of the fused backend: auto (cuDNN on strided views where it runs, as users "
        "get it) or triton (the Triton kernels only); sets DILATED_ATTN_ENGINE for the run",
    )
    k.add_argument(
        "--longest",
        type=token_counts,
        default=[2 << 20, 4 << 20, 8 << 20],
        help="comma-separated lengths (suffix K or M) tried for the longest runs (default 2M,4M,8M)",
    )
    only = k.add_mutually_exclusive_group()
    only.add_argument(
        "--variants",
        action="store_true",
        help="only time the forward under each kernel variant (tensor descriptors or pointer loads, tiles)",
    )
    only.add_argument(
        "--backward-variants",
        action="store_true",
        help="only time forward+backward of the full-length target rows under each backward variant (dQ "
        "recomputed or by tile reductions, LSE head-major or not), --runs times, with the autotuner's "
        "timing of every backward tile",
    )
    k.add_argument(
        "--variant-tiles",
        type=tiles,
        default=list(VARIANT_TILES),
        help="tiles for --variants: 'BLOCK_M,BLOCK_N,warps,stages;...'",
    )
    k.set_defaults(command="dilated_attn_bench.kernel:main", needs=("triton",))


def _compile_check_parser(sub: Any) -> None:
    k = sub.add_parser(
        "compile-check",
        help="compile every Triton autotuning candidate for a GPU target, no GPU needed",
        description="For each kernel and candidate tile: registers, spilled bytes (stack), shared memory and "
        "whether the block products use wgmma. Needs the ptxas/cuobjdump that ship with Triton, not a GPU. "
        "A compile check, not a speed measurement.",
    )
    k.add_argument("--arch", type=positive(int), default=90, help="compute capability, e.g. 90 for H100/H200")
    k.set_defaults(command="dilated_attn_bench.compile_check:main", needs=("triton",))


def _sparse_parser(sub: Any) -> None:
    s = sub.add_parser(
        "sparse",
        help="block-sparse attention against dense cuDNN attention on one GPU (needs dilated-attn-sparse)",
        description="For each block density, times block_sparse_attention (forward, forward+backward) with "
        "local_window, random_blocks and dilated_blocks patterns sized to that density, and dense SDPA on the "
        "same shape; reports time / (dense time x density), target <= 1.3. A correctness check against the "
        "float64 reference at a small length runs first. --device cpu runs the same steps at a toy size.",
    )
    s.add_argument("--out", type=Path, required=True, help="where to write the full results (JSON)")
    s.add_argument("--md", type=Path, help="also write a markdown summary here")
    s.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    s.add_argument("--n", type=positive(int), default=262_144, help="sequence length")
    s.add_argument("--heads", type=positive(int), default=16)
    s.add_argument("--head-dim", type=positive(int), default=64)
    s.add_argument("--block-size", type=positive(int), default=128)
    s.add_argument(
        "--densities", type=densities, default=[0.01, 0.05, 0.25], help="block densities in (0, 1]"
    )
    s.add_argument("--kinds", type=one_of(SPARSE_KINDS, "a pattern kind"), default=list(SPARSE_KINDS))
    s.add_argument("--check-n", type=positive(int), default=1000, help="length of the correctness check")
    s.add_argument("--check-fp32", action="store_true", help="also check float32 (one more compile)")
    s.add_argument("--skip-check", action="store_true")
    s.add_argument(
        "--budget", type=non_negative(float), default=0.5, help="seconds of timed repetitions per measurement"
    )
    s.add_argument(
        "--kernel-options",
        type=json_object,
        default=None,
        help="FlexAttention options, e.g. '{\"BLOCK_M\": 128}'",
    )
    s.set_defaults(command="dilated_attn_bench.sparse:main", needs=("dilated_attn_sparse",))


def _flex_tuning_parser(sub: Any) -> None:
    p = sub.add_parser(
        "flex-tuning",
        help="a sweep of FlexAttention kernel options for block-sparse attention (needs dilated-attn-sparse)",
        description="Measures dense SDPA once, then for each pattern kind sized to the block density times "
        "block_sparse_attention under each candidate kernel_options (forward candidates, backward candidates, "
        "--extra-options, then the best forward merged with the best backward). Each result is compared with "
        "the default options' (err_vs_default); one past 2e-2 is suspect and never chosen. The JSON file is "
        "rewritten after every timing. --device cpu is a smoke test at a toy size.",
    )
    p.add_argument("--out", type=Path, required=True, help="where to write the full results (JSON)")
    p.add_argument("--md", type=Path, help="also write the markdown table here")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--n", type=positive(int), help="sequence length (default 262144 on CUDA, 1024 on CPU)")
    p.add_argument("--heads", type=positive(int), help="default 16 on CUDA, 2 on CPU")
    p.add_argument("--head-dim", type=positive(int), help="default 64 on CUDA, 16 on CPU")
    p.add_argument("--block-size", type=positive(int), default=128)
    p.add_argument("--density", type=densities, default=[0.05], help="block density, or a comma list")
    p.add_argument(
        "--kinds", type=one_of(FLEX_TUNING_KINDS, "a pattern kind"), default=list(FLEX_TUNING_KINDS)
    )
    p.add_argument(
        "--candidates",
        default="both",
        choices=("fwd", "bwd", "both", "none"),
        help="built-in candidate lists to run (--extra-options candidates always run)",
    )
    p.add_argument(
        "--extra-options",
        type=json_objects,
        default=[],
        help="JSON list of more kernel_options dicts, timed forward and forward+backward",
    )
    p.add_argument(
        "--max-candidates", type=positive(int), help="run only the first N candidates of each built-in list"
    )
    p.add_argument("--no-combine", action="store_true", help="skip the best-forward + best-backward run")
    p.add_argument(
        "--budget", type=non_negative(float), default=0.5, help="seconds of timed repetitions per measurement"
    )
    p.add_argument(
        "--max-seconds",
        type=non_negative(float),
        default=420.0,
        help="no candidate starts after this many seconds; the rest are recorded as skipped",
    )
    p.add_argument(
        "--dense-from",
        type=Path,
        help="take the dense timings from this earlier flex-tuning / sparse JSON instead of measuring",
    )
    p.set_defaults(command="dilated_attn_bench.flex_tuning:main", needs=("dilated_attn_sparse",))


def _ring_parser(sub: Any) -> None:
    r = sub.add_parser(
        "ring",
        help="exactness and weak scaling of ring attention on GPUs over NCCL (needs dilated-attn-ring)",
        description="Run under torchrun: 'torchrun --nproc-per-node N -m dilated_attn_bench ring --out ring.json' "
        "(plain 'dilated-attn-bench ring' runs the one-GPU baseline only). Checks every rank's chunk against "
        "the float64 oracle at a small size, then times longnet-1m settings with --n-local tokens per GPU on "
        "one GPU and on all of them, and with a pattern spanning every GPU. Rank 0 prints a table and "
        "writes --out.",
    )
    r.add_argument("--out", type=Path, required=True, help="JSON results (written by rank 0)")
    r.add_argument("--n-local", type=positive(int), default=1 << 20, help="tokens per GPU (default 1M)")
    r.add_argument("--iters", type=positive(int), default=5)
    r.add_argument("--warmup", type=positive(int), default=2)
    r.add_argument("--no-spanning", action="store_true", help="skip the whole-sequence pattern")
    r.add_argument("--no-causal", action="store_true", help="skip the causal longnet-1m scaling run")
    r.add_argument(
        "--no-ring-alone",
        action="store_true",
        help="skip the ring on a group of one (the ratios are against core auto on one GPU either way)",
    )
    r.add_argument(
        "--longest",
        type=token_counts,
        default=[4 << 20, 6 << 20, 8 << 20],
        help="comma-separated tokens per GPU (suffix K or M) to try forward+backward through the ring at, "
        "stopping at the first that does not fit; '' skips (default 4M,6M,8M)",
    )
    r.set_defaults(command="dilated_attn_bench.ring:main", needs=("dilated_attn_ring",))


def _decode_parser(sub: Any) -> None:
    d = sub.add_parser(
        "decode",
        help="one cached decode step against dense SDPA decoding on a full cache (CUDA)",
        description="For each context length and batch: the per-token latency of one decode step through "
        "DilatedKVCache (eager and CUDA-graph replay), its cache bytes per sequence, and dense "
        "scaled_dot_product_attention decoding over a full (b, h, n, d) cache in the same process. "
        "Writes decode.md, decode.json and decode.png into --out.",
    )
    d.add_argument("--out", type=Path, required=True, help="output folder")
    d.add_argument(
        "--contexts",
        type=positive_ints,
        default=[8192, 65536, 262144, 1048576, 4194304],
        help="context lengths (default %(default)s)",
    )
    d.add_argument("--batches", type=positive_ints, default=[1, 64], help="batch sizes (default %(default)s)")
    d.add_argument(
        "--preset", choices=PRESET_NAMES, default="longnet-1m", help="pattern, heads, head_dim, dtype"
    )
    d.add_argument("--repeats", type=positive(int), default=100)
    d.set_defaults(command="dilated_attn_bench.decode:main", needs=("triton",))


def _gqa_parser(sub: Any) -> None:
    g = sub.add_parser(
        "gqa",
        help="grouped-query attention: K/V read in place against K/V repeated to every head (CUDA)",
        description="Times dilated_attention forward and forward+backward, and their peak memory beyond the "
        "inputs, with (b, n, h_kv, d) K/V as given and with K/V repeated to the query heads first.",
    )
    g.add_argument("--out", type=Path, required=True, help="JSON results")
    g.add_argument("--preset", choices=PRESET_NAMES, default="longnet-256k")
    g.add_argument("--n", type=positive(int), default=None, help="sequence length (default: the preset's)")
    g.add_argument(
        "--kv-heads", type=positive_ints, default=[4, 1], help="K/V head counts (default %(default)s)"
    )
    g.add_argument("--repeats", type=positive(int), default=10)
    g.set_defaults(command="dilated_attn_bench.gqa:main")


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Benchmark every registered dilated-attention backend against dense and segment "
        "baselines, and the studies of the kernels, pools, block-sparse and ring attention.",
    )
    sub = parser.add_subparsers(dest="name", required=True, metavar="command")
    for add in (
        _run_parser,
        _compare_parser,
        _pool_parser,
        _kernel_parser,
        _compile_check_parser,
        _sparse_parser,
        _flex_tuning_parser,
        _ring_parser,
        _decode_parser,
        _gqa_parser,
    ):
        add(sub)
    for name, subparser in sub.choices.items():
        subparser.set_defaults(parser=subparser)
        subparser.prog = f"{PROG} {name}"
    return parser


# Distributions that provide each optional import, for the one-line message when one is missing.
_DISTRIBUTIONS = {
    "triton": "triton (it ships with PyTorch's CUDA wheels)",
    "dilated_attn_sparse": "dilated-attn-sparse (pip install ./packages/sparse)",
    "dilated_attn_ring": "dilated-attn-ring (pip install ./packages/ring)",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    subparser: argparse.ArgumentParser = args.parser
    for module in getattr(args, "needs", ()):
        if importlib.util.find_spec(module) is None:
            subparser.error(f"needs {_DISTRIBUTIONS[module]}, which is not installed")
    module_name, function = args.command.split(":")
    try:
        return int(getattr(importlib.import_module(module_name), function)(args))
    except UsageError as exc:
        subparser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
