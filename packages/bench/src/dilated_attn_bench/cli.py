"""``dilated-attn-bench``: the ``run``, ``compare`` and ``pool`` subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dilated_attn_bench import compare as compare_mod
from dilated_attn_bench import pool_bench
from dilated_attn_bench.baselines import SegmentCeiling, dense_baselines
from dilated_attn_bench.distributed import init_world, shutdown
from dilated_attn_bench.environment import default_output_dir, describe
from dilated_attn_bench.implementations import Implementation
from dilated_attn_bench.outputs import console_table, write_reports
from dilated_attn_bench.presets import (
    CPU_DEFAULT_PRESETS,
    DTYPES,
    GPU_DEFAULT_PRESETS,
    PRESETS,
    Overrides,
    expand,
)
from dilated_attn_bench.records import Record, read_json
from dilated_attn_bench.registered import registered_backends
from dilated_attn_bench.report import headline
from dilated_attn_bench.runner import Settings, run

# Per device: (warm-up calls, timed calls at most, seconds of timed calls a phase aims for, a first
# call slower than this many seconds is the only sample). Nothing compiles on the CPU paths, so there
# a call of many seconds is timed once rather than warmed up: cpu-quick's float64 oracle row would
# otherwise take most of the two minutes the CPU run has.
TIMING_DEFAULTS: dict[str, tuple[int, int, float, float | None]] = {
    "cuda": (3, 20, 2.0, None),
    "cpu": (1, 3, 1.0, 5.0),
}
DENSE_MAX_SEQ = 262_144
# Rows as they finish, one JSON record a line; removed once the full report is written.
PARTIAL = "results.partial.jsonl"


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated ints, e.g. 2048,4096") from None


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be a positive {kind.__name__}")
        return value

    return parse


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device=cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def _matching(flag: str, patterns: Sequence[str], names: Sequence[str]) -> set[str]:
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unknown:
        raise SystemExit(f"{flag}: {unknown} match no implementation; known: {list(names)}")
    return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def select_implementations(
    include: Sequence[str] | None, exclude: Sequence[str] | None = None
) -> list[Implementation]:
    """Kept by ``--backends`` and dropped by ``--exclude`` globs, cheapest first.

    The segment ceiling comes first (every ratio needs it), the quadratic dense baselines last, so
    that a run cut short still holds the dilated rows.
    """
    available: list[Implementation] = [SegmentCeiling(), *registered_backends(), *dense_baselines()]
    names = [impl.name for impl in available]
    clashes = {name for name in names if names.count(name) > 1}
    if clashes:
        raise SystemExit(
            f"registered backend name(s) {sorted(clashes)} clash with bench baselines; rename them"
        )
    keep = _matching("--backends", include, names) if include else set(names)
    keep -= _matching("--exclude", exclude, names) if exclude else set()
    return [impl for impl in available if impl.name in keep]


def _run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    world, device = init_world(device)
    try:
        presets = args.preset or (GPU_DEFAULT_PRESETS if device.type == "cuda" else CPU_DEFAULT_PRESETS)
        overrides = Overrides(
            batch=args.batch,
            seq_len=args.seq,
            heads=args.heads,
            head_dim=args.dim,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            segment_lengths=args.segments,
            dilation_rates=args.dilations,
            causal=args.causal,
            mode=args.mode,
        )
        try:
            workloads = expand(presets, overrides)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"dilated-attn-bench run: {exc}") from None
        implementations = select_implementations(args.backends, args.exclude)
        warmup, repeats, budget, once_past_s = TIMING_DEFAULTS[device.type]
        settings = Settings(
            device=device,
            warmup=warmup if args.warmup is None else args.warmup,
            repeats=repeats if args.repeats is None else args.repeats,
            budget_s=budget if args.phase_budget is None else args.phase_budget,
            backward=not args.no_backward,
            dense_max_seq=args.dense_max_seq,
            once_past_s=once_past_s,
        )
        out_dir = args.output or default_output_dir(args.commit)
        partial = out_dir / PARTIAL
        if world.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            partial.write_text("")

        def keep(record: Record) -> None:
            # A run killed by a time limit still leaves every finished row behind.
            with partial.open("a") as handle:
                handle.write(json.dumps(dataclasses.asdict(record)) + "\n")

        records = run(implementations, workloads, settings, world, on_record=keep if world.is_main else None)
        if not world.is_main:
            return 0
        meta = describe(device, world.size, args.commit)
        parameters = {
            "device": str(device),
            "presets": ", ".join(presets),
            "workloads": "; ".join(
                f"{w.preset}: {w.describe()}, segments {list(w.segment_lengths)}, "
                f"dilations {list(w.dilation_rates)}"
                for w in workloads
            ),
            "implementations": ", ".join(impl.name for impl in implementations),
            "warm-up calls": settings.warmup,
            "timed calls (at most)": settings.repeats,
            "seconds of timed calls per phase (fewer calls past it)": settings.budget_s,
            "backward": settings.backward,
            "dense-max-seq": settings.dense_max_seq,
            "world size": world.size,
        }
        paths = write_reports(out_dir, records, meta, parameters)
        partial.unlink()
        print(console_table(records))
        print()
        print(headline(records).replace("**", ""))
        print(f"wrote {', '.join(str(p) for p in paths)}")
        return 0
    finally:
        shutdown(world)


def _compare(args: argparse.Namespace) -> int:
    a, _ = read_json(args.a)
    b, _ = read_json(args.b)
    print(compare_mod.render(*compare_mod.compare(a, b, threshold=args.threshold)))
    return 0


def _pool(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    budget = int(args.budget_mb * 2**20)
    shapes = pool_bench.workspace_shapes(args.seq, args.heads, args.dim)
    results = pool_bench.bench_pools(
        device,
        budget_bytes=budget,
        shapes=shapes,
        pairs=args.pairs,
        steps=args.steps,
        held=args.held,
    )
    print(
        pool_bench.render(
            results, device=device, budget_bytes=budget, shapes=shapes, steps=args.steps, held=args.held
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dilated-attn-bench",
        description="Benchmark every registered dilated-attention backend against dense and segment "
        "baselines.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="time, memory, TFLOP/s and correctness; writes a report folder")
    p.add_argument(
        "--preset",
        type=_names,
        action="extend",
        help=f"one or more of {', '.join(PRESETS)} (default: {', '.join(GPU_DEFAULT_PRESETS)} on a "
        f"GPU, {', '.join(CPU_DEFAULT_PRESETS)} on a CPU)",
    )
    p.add_argument("--batch", type=_ints, help="batch sizes, comma-separated (overrides the preset's)")
    p.add_argument("--seq", type=_ints, help="sequence lengths, comma-separated")
    p.add_argument("--heads", type=_positive(int))
    p.add_argument("--dim", type=_positive(int), help="head dimension")
    p.add_argument("--segments", type=_ints, help="segment lengths, comma-separated")
    p.add_argument("--dilations", type=_ints, help="dilation rates, comma-separated")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--mode", choices=("longnet", "head_groups"))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--backends", type=_names, help="implementations to run: names or globs, e.g. 'sdpa,dense-*'"
    )
    p.add_argument(
        "--exclude",
        type=_names,
        help="implementations not to run, e.g. 'reference' (the O(h n^2) float64 oracle) at long lengths",
    )
    p.add_argument("--repeats", type=_positive(int), help="timed calls per phase, at most")
    p.add_argument("--warmup", type=_positive(int), help="untimed calls before timing")
    p.add_argument("--phase-budget", type=_positive(float), help="seconds of timed calls a phase aims for")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument(
        "--dense-max-seq",
        type=_positive(int),
        default=DENSE_MAX_SEQ,
        help="skip dense baselines past this length (default %(default)s)",
    )
    p.add_argument("--commit", help="the commit to report where the working directory is no git checkout")
    p.add_argument("--output", type=Path, help="report folder (default bench-results/<date>-<commit>)")
    p.set_defaults(func=_run)

    c = sub.add_parser("compare", help="speedups and regressions of run B over run A")
    c.add_argument("a", type=Path, help="results.json of the baseline run")
    c.add_argument("b", type=Path, help="results.json of the new run")
    c.add_argument(
        "--threshold",
        type=float,
        default=compare_mod.DEFAULT_THRESHOLD,
        help="relative change read as noise (default %(default)s)",
    )
    c.set_defaults(func=_compare)

    q = sub.add_parser("pool", help="acquire/release cost and a memory report of every registered pool")
    q.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    q.add_argument(
        "--budget-mb",
        type=_positive(float),
        default=64.0,
        help="each pool's budget_bytes in MB (default %(default)s: the replay evicts)",
    )
    q.add_argument(
        "--seq",
        type=_ints,
        default=[1024, 1536, 2048, 3072, 4096],
        help="workspace lengths of the replayed workload",
    )
    q.add_argument("--heads", type=_positive(int), default=16)
    q.add_argument("--dim", type=_positive(int), default=64)
    q.add_argument(
        "--pairs", type=_positive(int), default=2000, help="acquire/release pairs per timing round"
    )
    q.add_argument("--steps", type=_positive(int), default=200, help="acquires in the replayed workload")
    q.add_argument(
        "--held", type=_positive(int), default=4, help="leases held at once in the replayed workload"
    )
    q.set_defaults(func=_pool)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
