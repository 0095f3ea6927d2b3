"""Time and memory against sequence length, log-log, one line per implementation and workload shape."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dilated_attn_bench.records import Record

# (title, forward field, forward+backward field, y label, what an empty panel says)
PLOTS = {
    "time_vs_seq_len.png": ("Time per call", "time_ms", "fwd_bwd_ms", "time (ms)", "no measurements"),
    "memory_vs_seq_len.png": (
        "Peak memory beyond inputs",
        "memory_mb",
        "fwd_bwd_memory_mb",
        "memory (MB)",
        # A CPU keeps no peak counter: an empty panel says so, where zeros would lie.
        "no measurements\n(peak memory is measured on CUDA only)",
    ),
}


def _is_dense(name: str) -> bool:
    return name.startswith("dense-")


# Workload fields that may tell two lines of one implementation apart, with their legend spelling.
_DISTINCT = {
    "batch": "b={}",
    "heads": "h={}",
    "head_dim": "d={}",
    "dtype": "{}",
    "mode": "{}",
    "causal": "causal={}",
    "dilation_rates": "r={}",
    "segment_lengths": "w={}",
}


def _series(records: Sequence[Record], field: str) -> dict[str, list[tuple[int, float]]]:
    """Points ``(seq_len, value)`` per line: an implementation, split by any workload field that varies."""
    varying = [name for name in _DISTINCT if len({str(getattr(r, name)) for r in records}) > 1]
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        value = getattr(r, field)
        if value is None or value <= 0:  # a log axis has no place for 0
            continue
        suffix = ", ".join(_DISTINCT[name].format(getattr(r, name)) for name in varying)
        lines[f"{r.implementation} ({suffix})" if suffix else r.implementation].append((r.seq_len, value))
    return {k: sorted(v) for k, v in lines.items()}


def _dense_reference(
    lines: dict[str, list[tuple[int, float]]], x_max: int
) -> tuple[list[int], list[float], str] | None:
    """An ``n^2`` curve through the fastest dense point at the longest measured dense length.

    Dense rows stop at ``--dense-max-seq``; the curve shows where dense attention would be past it.
    """
    points = [(n, y, label) for label, pts in lines.items() if _is_dense(label) for n, y in pts]
    if not points:
        return None
    n_ref = max(n for n, _, _ in points)
    y_ref, label = min((y, label) for n, y, label in points if n == n_ref)
    xs = sorted({n for pts in lines.values() for n, _ in pts} | {n_ref, x_max})
    return xs, [y_ref * (n / n_ref) ** 2 for n in xs], f"dense ∝ n² (through {label})"


def _panel(
    ax: Axes,
    lines: dict[str, list[tuple[int, float]]],
    title: str,
    ylabel: str,
    colors: dict[str, Any],
    empty: str,
) -> None:
    ax.set_title(title)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(ylabel)
    if not lines:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
        return
    for label, pts in sorted(lines.items()):
        style = "--" if _is_dense(label) else "-"
        ax.plot([n for n, _ in pts], [y for _, y in pts], style, marker="o", label=label, color=colors[label])
    reference = _dense_reference(lines, max(n for pts in lines.values() for n, _ in pts))
    if reference is not None:
        xs, ys, label = reference
        ax.plot(xs, ys, ":", color="grey", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def write_plots(out_dir: Path, records: Sequence[Record], device: str) -> list[Path]:
    """Write each plot of :data:`PLOTS` as a PNG (Agg, no display needed); returns the paths."""
    paths = []
    for filename, (title, fwd_field, both_field, ylabel, empty) in PLOTS.items():
        fig = Figure(figsize=(13, 5.5), layout="constrained")
        forward_ax, both_ax = fig.subplots(1, 2)
        forward, both = _series(records, fwd_field), _series(records, both_field)
        # One colour per line across both panels, so a backend is found at a glance in either.
        tab20 = [matplotlib.colormaps["tab20"](i) for i in range(20)]
        palette = tab20[::2] + tab20[1::2]  # the ten strong colours before their pale twins
        colors = {
            label: palette[i % len(palette)] for i, label in enumerate(sorted(forward.keys() | both.keys()))
        }
        _panel(forward_ax, forward, "forward", ylabel, colors, empty)
        _panel(both_ax, both, "forward + backward", ylabel, colors, empty)
        fig.suptitle(f"{title} on {device} (log-log)")
        path = out_dir / filename
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
