"""The ``run``, ``compare`` and ``pool`` commands; ``cli`` imports this module only to run one."""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from dilated_attn_bench import compare as compare_mod
from dilated_attn_bench import pool_bench
from dilated_attn_bench.baselines import SegmentCeiling, dense_baselines
from dilated_attn_bench.cli import UsageError, writable_dir, writable_file
from dilated_attn_bench.distributed import init_world, shutdown
from dilated_attn_bench.environment import default_output_dir, describe
from dilated_attn_bench.implementations import Implementation
from dilated_attn_bench.outputs import console_table, write_reports
from dilated_attn_bench.presets import CPU_DEFAULT_PRESETS, DTYPES, GPU_DEFAULT_PRESETS, Overrides, expand
from dilated_attn_bench.records import FAILED, Record, read_json
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
# Rows as they finish, one JSON record a line; removed once the full report is written.
PARTIAL = "results.partial.jsonl"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device=cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def _matching(flag: str, patterns: Sequence[str], names: Sequence[str]) -> set[str]:
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unknown:
        raise UsageError(f"{flag}: {unknown} match no implementation; known: {list(names)}")
    return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def select_implementations(
    include: Sequence[str] | None, exclude: Sequence[str] | None = None
) -> list[Implementation]:
    """Kept by ``--backends`` and dropped by ``--exclude`` globs, cheapest first.

    The segment ceiling comes first (every ratio needs it), the quadratic dense baselines last, so
    that a run cut short still holds the dilated rows. A selection that leaves nothing is refused.
    """
    available: list[Implementation] = [SegmentCeiling(), *registered_backends(), *dense_baselines()]
    names = [impl.name for impl in available]
    clashes = {name for name in names if names.count(name) > 1}
    if clashes:
        raise UsageError(
            f"registered backend name(s) {sorted(clashes)} clash with bench baselines; rename them"
        )
    keep = _matching("--backends", include, names) if include else set(names)
    keep -= _matching("--exclude", exclude, names) if exclude else set()
    if not keep:
        raise UsageError(
            f"--backends={','.join(include or ['*'])} --exclude={','.join(exclude or [])} leave no "
            f"implementation to run; known: {names}"
        )
    return [impl for impl in available if impl.name in keep]


def run_command(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    out_dir = writable_dir("--output", args.output or default_output_dir(args.commit))
    implementations = select_implementations(args.backends, args.exclude)
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
            raise UsageError(str(exc)) from None
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
        partial = out_dir / PARTIAL
        if world.is_main:
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
        return _run_status(records)
    finally:
        shutdown(world)


def _run_status(records: Sequence[Record]) -> int:
    """0 when some row measured something; 1 (with one line saying so) when none did."""
    if any(r.ok for r in records):
        return 0
    failed = sum(r.status.startswith(FAILED) for r in records)
    print(
        f"dilated-attn-bench run: no row completed ({failed} failed, {len(records) - failed} skipped "
        f"of {len(records)})",
        file=sys.stderr,
    )
    return 1


def _read(flag: str, path: Path) -> list[Record]:
    try:
        records, _ = read_json(path)
    except OSError as exc:
        raise UsageError(f"{flag}={str(path)!r}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise UsageError(f"{flag}={str(path)!r}: {exc}") from None
    return records


def compare_command(args: argparse.Namespace) -> int:
    a, b = _read("a", args.a), _read("b", args.b)
    changes, only_a, only_b = compare_mod.compare(a, b, threshold=args.threshold)
    print(compare_mod.render(changes, only_a, only_b))
    return 1 if any(compare_mod.is_regression(c) for c in changes) else 0


def pool_command(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    out = writable_file("--out", args.out) if args.out is not None else None
    if not args.no_attention:
        why = pool_bench.check_backend(args.backend)
        if why is not None:
            raise UsageError(why)
    budget = int(args.budget_mb * 2**20)
    shapes = pool_bench.workspace_shapes(args.seq, args.heads, args.dim)
    results = pool_bench.bench_pools(
        device,
        budget_bytes=budget,
        shapes=shapes,
        pairs=args.pairs,
        rounds=args.repeats,
        steps=args.steps,
        held=args.held,
    )
    print(
        pool_bench.render(
            results, device=device, budget_bytes=budget, shapes=shapes, steps=args.steps, held=args.held
        )
    )
    ledgers = pool_bench.raw_ledger_pairs(args.pairs, args.repeats)
    print()
    print(pool_bench.render_ledgers(ledgers))
    study: dict[str, object] | str = "skipped: --no-attention"
    if not args.no_attention:
        study = pool_bench.attention_study(
            device,
            calls=args.calls,
            rounds=args.repeats,
            budget_bytes=int(args.attention_budget_mb * 2**20),
            backend=args.backend,
        )
    print()
    print(pool_bench.render_attention(study))
    if out is not None:
        out.write_text(json.dumps(pool_bench.results_json(device, results, shapes, ledgers, study), indent=2))
        print(f"wrote {out}")
    return 0
