"""The Markdown report: where and how the run happened, the headline ratio, every row."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from dilated_attn_bench.baselines import CEILING
from dilated_attn_bench.implementations import KIND_DILATED
from dilated_attn_bench.records import FAILED, SKIPPED, Record

NA = "n/a"


def fmt(value: float | None, spec: str = ".2f") -> str:
    return NA if value is None else format(value, spec)


def _ms(median: float | None, p10: float | None, p90: float | None) -> str:
    if median is None:
        return NA
    return f"{median:.3g} ({p10:.3g}–{p90:.3g})"


def _error(record: Record) -> str:
    if record.rel_error is None:
        return NA
    text = f"{record.rel_error:.1e}"
    if record.grad_rel_error is not None:
        text += f" / {record.grad_rel_error:.1e}"
    return f"{text} (n={record.error_seq_len})"


def _workload(record: Record) -> str:
    return f"{record.preset} ({record.describe()})"


def _ratio_of(record: Record) -> tuple[bool, float] | None:
    """``(is forward+backward, ratio)``: forward+backward when measured, else forward; it sorts so."""
    if record.fwd_bwd_ceiling_ratio is not None:
        return True, record.fwd_bwd_ceiling_ratio
    if record.ceiling_ratio is not None:
        return False, record.ceiling_ratio
    return None


def _best_dilated(records: Sequence[Record]) -> Record | None:
    rated = [r for r in records if r.kind == KIND_DILATED and r.ok and _ratio_of(r) is not None]
    return max(rated, key=lambda r: _ratio_of(r) or (False, 0.0), default=None)


def _by_workload(records: Sequence[Record]) -> dict[tuple[Any, ...], list[Record]]:
    groups: dict[tuple[Any, ...], list[Record]] = defaultdict(list)
    for r in records:
        groups[r.workload_key()].append(r)
    return groups


def _get(record: Record | None, name: str, spec: str = ".2f") -> str:
    return fmt(getattr(record, name) if record is not None else None, spec)


# A median over fewer timed calls than this is reported as an indication, not a measurement.
MIN_SAMPLES = 5


def fewest_samples(records: Sequence[Record]) -> int | None:
    """The fewest timed calls behind any timed phase of an ok row (``None`` when nothing was timed)."""
    counts = [
        n
        for r in records
        if r.ok
        for n, ms in ((r.repeats, r.time_ms), (r.fwd_bwd_repeats, r.fwd_bwd_ms))
        if ms is not None and n is not None
    ]
    return min(counts, default=None)


def headline(records: Sequence[Record]) -> str:
    """One sentence: the best dilated backend's ratio to the segment ceiling on the largest workload.

    When some row stands on fewer than ``MIN_SAMPLES`` timed calls, the sentence says so first and
    gives the ratio as an indication.
    """
    groups = _by_workload(records)
    candidates = [(g[0].batch * g[0].seq_len, best) for g in groups.values() if (best := _best_dilated(g))]
    if not candidates:
        return "No dilated backend completed a workload with a segment ceiling: there is no headline ratio."
    _, best = max(candidates, key=lambda c: c[0])
    both, ratio = _ratio_of(best) or (False, 0.0)
    field = "fwd_bwd_tflops" if both else "tflops"
    ceiling = next(r for r in groups[best.workload_key()] if r.implementation == CEILING)
    per_device = (getattr(best, field) or 0.0) / best.world_size
    phase = "forward+backward" if both else "forward"
    numbers = (
        f"({per_device:.3g} vs {_get(ceiling, field, '.3g')} TFLOP/s"
        f"{' per device' if best.world_size > 1 else ''})"
    )
    fewest = fewest_samples(records)
    if fewest is not None and fewest < MIN_SAMPLES:
        return (
            f"Too few samples for a measured ratio: some rows stand on {fewest} timed call"
            f"{'s' if fewest != 1 else ''} (fewer than {MIN_SAMPLES}; raise --repeats and --phase-budget). "
            f"As an indication only: on {_workload(best)}, `{best.implementation}` ran {phase} at about "
            f"{ratio:.2f}x the segment ceiling {numbers}."
        )
    return (
        f"On {_workload(best)}, the fastest dilated backend `{best.implementation}` runs "
        f"{phase} at **{ratio:.2f}x the segment ceiling** {numbers}."
    )


def _summary_rows(records: Sequence[Record]) -> list[str]:
    lines = [
        "| Workload | Best dilated backend | Ratio fwd / fwd+bwd | Segment ceiling TFLOP/s fwd / fwd+bwd "
        "| Dense flash TFLOP/s | Dense cuDNN TFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for group in _by_workload(records).values():
        by_name = {r.implementation: r for r in group}
        best = _best_dilated(group)
        ceiling = by_name.get(CEILING)
        lines.append(
            f"| {_workload(group[0])} | {best.implementation if best else NA} "
            f"| {_get(best, 'ceiling_ratio')} / {_get(best, 'fwd_bwd_ceiling_ratio')} "
            f"| {_get(ceiling, 'tflops', '.3g')} / {_get(ceiling, 'fwd_bwd_tflops', '.3g')} "
            f"| {_get(by_name.get('dense-sdpa-flash'), 'tflops', '.3g')} "
            f"| {_get(by_name.get('dense-sdpa-cudnn'), 'tflops', '.3g')} |"
        )
    return lines


DETAIL_COLUMNS = (
    "Implementation",
    "Preset",
    "Batch",
    "Seq Len",
    "Heads",
    "Time (ms)",
    "Fwd+Bwd (ms)",
    "Memory (MB)",
    "Fwd+Bwd Memory (MB)",
    "Throughput (tok/s)",
    "Fwd+Bwd Throughput (tok/s)",
    "TFLOP/s",
    "Fwd+Bwd TFLOP/s",
    "Ceiling Ratio",
    "Fwd+Bwd Ceiling Ratio",
    "Rel. Error fwd / grad",
    "Status",
)


def _detail_row(r: Record) -> str:
    cells = (
        f"`{r.implementation}`",
        r.preset,
        str(r.batch),
        f"{r.seq_len:,}",
        str(r.heads),
        _ms(r.time_ms, r.time_p10_ms, r.time_p90_ms),
        _ms(r.fwd_bwd_ms, r.fwd_bwd_p10_ms, r.fwd_bwd_p90_ms),
        fmt(r.memory_mb, ".1f"),
        fmt(r.fwd_bwd_memory_mb, ".1f"),
        fmt(r.throughput_tok_s, ",.0f"),
        fmt(r.fwd_bwd_throughput_tok_s, ",.0f"),
        fmt(r.tflops, ".3g"),
        fmt(r.fwd_bwd_tflops, ".3g"),
        fmt(r.ceiling_ratio),
        fmt(r.fwd_bwd_ceiling_ratio),
        _error(r),
        r.status.replace("|", "\\|"),
    )
    return "| " + " | ".join(cells) + " |"


def render(records: Sequence[Record], meta: dict[str, Any], parameters: dict[str, Any]) -> str:
    """The whole ``report.md``."""
    failed = sum(r.status.startswith(FAILED) for r in records)
    skipped = sum(r.status.startswith(SKIPPED) for r in records)
    lines = [
        "# Dilated attention benchmark",
        "",
        f"**Date**: {meta['date']}  ",
        f"**Git commit**: {meta['git_commit']}  ",
        f"**Hardware**: {meta['hardware']}  ",
        f"**Software**: Python {meta['python']}, torch {meta['torch']}, CUDA {meta['cuda'] or NA}, "
        f"cuDNN {meta['cudnn'] or NA}, dilated-attn {meta['dilated_attn']}  ",
        "**Registered backends**: "
        + (", ".join(f"`{name}` ({source})" for name, source in sorted(meta["backends"].items())) or "none"),
        "",
        "## Parameters",
        "",
        *(f"- **{key}**: {value}" for key, value in parameters.items()),
        "",
        "## Summary",
        "",
        headline(records),
        "",
        f"{len(records)} rows: {len(records) - failed - skipped} ok, {failed} failed, {skipped} skipped.",
        "",
        *_summary_rows(records),
        "",
        "The segment ceiling is SDPA on a batch of independent 2048-token segments with the same tokens and "
        "heads: the same shape of work as one dilated pattern, so a ratio near 1 means the dilated backend "
        "runs its useful FLOPs as fast as the best case of its own building block. "
        "Useful FLOPs follow SPEC §3 "
        "(forward+backward = 3.5x forward); dense rows count `4 b h n² d`.",
        "",
        "## Detailed results",
        "",
        "Times: median (p10–p90) per call, in ms (CUDA events on a GPU, perf_counter on a CPU). "
        "Memory: peak allocated beyond the inputs "
        "(reserved is in results.json); n/a where the device keeps no peak counter. Rel. error: against the "
        "float64 oracle at the length shown, same pattern, mode and causality.",
        "",
        "| " + " | ".join(DETAIL_COLUMNS) + " |",
        "|" + "---|" * len(DETAIL_COLUMNS),
        *(_detail_row(r) for r in records),
    ]
    notes = [f"- `{r.implementation}`, {_workload(r)}: {'; '.join(r.notes)}" for r in records if r.notes]
    if notes:
        lines += ["", "## Notes", "", *notes]
    lines += ["", "![time](time_vs_seq_len.png)", "", "![memory](memory_vs_seq_len.png)", ""]
    return "\n".join(lines)
