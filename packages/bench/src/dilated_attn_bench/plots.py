"""Time and memory against sequence length, log-log, one line per implementation (and batch)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from dilated_attn_bench.records import Record

# (title, forward field, forward+backward field, y label)
PLOTS = {
    "time_vs_seq_len.png": ("Time per call", "time_ms", "fwd_bwd_ms", "time (ms)"),
    "memory_vs_seq_len.png": ("Peak memory beyond inputs", "memory_mb", "fwd_bwd_memory_mb", "memory (MB)"),
}


def _is_dense(name: str) -> bool:
    return name.startswith("dense-")


def _series(records: Sequence[Record], field: str) -> dict[str, list[tuple[int, float]]]:
    batches = {r.batch for r in records}
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        value = getattr(r, field)
        if value is None or value <= 0:
            continue
        label = r.implementation if len(batches) == 1 else f"{r.implementation} (b={r.batch})"
        lines[label].append((r.seq_len, value))
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
    ax: Axes, lines: dict[str, list[tuple[int, float]]], title: str, ylabel: str, colors: dict[str, Any]
) -> None:
    ax.set_title(title)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(ylabel)
    if not lines:
        # E.g. memory on a CPU, which keeps no peak counter: an empty panel says so, zeros would lie.
        ax.text(0.5, 0.5, "no measurements", ha="center", va="center", transform=ax.transAxes)
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
    for filename, (title, fwd_field, both_field, ylabel) in PLOTS.items():
        fig = Figure(figsize=(13, 5.5), layout="constrained")
        forward_ax, both_ax = fig.subplots(1, 2)
        forward, both = _series(records, fwd_field), _series(records, both_field)
        # One colour per line across both panels, so a backend is found at a glance in either.
        tab20 = [matplotlib.colormaps["tab20"](i) for i in range(20)]
        palette = tab20[::2] + tab20[1::2]  # the ten strong colours before their pale twins
        colors = {
            label: palette[i % len(palette)] for i, label in enumerate(sorted(forward.keys() | both.keys()))
        }
        _panel(forward_ax, forward, "forward", ylabel, colors)
        _panel(both_ax, both, "forward + backward", ylabel, colors)
        fig.suptitle(f"{title} on {device} (log-log)")
        path = out_dir / filename
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
