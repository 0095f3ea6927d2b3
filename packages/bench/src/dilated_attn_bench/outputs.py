"""The report folder: report.md, results.json, results.csv and the plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dilated_attn_bench import plots, report
from dilated_attn_bench.records import Record, write_csv, write_json

REPORT = "report.md"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"


def write_reports(
    out_dir: Path, records: Sequence[Record], meta: dict[str, Any], parameters: dict[str, Any]
) -> list[Path]:
    """Write every file of a run into ``out_dir`` (created); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / RESULTS_JSON, records, {**meta, "parameters": parameters})
    write_csv(out_dir / RESULTS_CSV, records)
    (out_dir / REPORT).write_text(report.render(records, meta, parameters))
    pngs = plots.write_plots(out_dir, records, meta["hardware"])
    return [out_dir / REPORT, out_dir / RESULTS_JSON, out_dir / RESULTS_CSV, *pngs]


def console_table(records: Sequence[Record]) -> str:
    """A short fixed-width table for the terminal; the report has every column."""
    header = ("implementation", "preset", "n", "fwd ms", "fwd+bwd ms", "TFLOP/s", "x ceiling", "status")
    rows = [
        (
            r.implementation,
            r.preset,
            f"{r.seq_len:,}",
            report.fmt(r.time_ms, ".3g"),
            report.fmt(r.fwd_bwd_ms, ".3g"),
            report.fmt(r.fwd_bwd_tflops if r.fwd_bwd_tflops is not None else r.tflops, ".3g"),
            report.fmt(r.fwd_bwd_ceiling_ratio if r.fwd_bwd_ceiling_ratio is not None else r.ceiling_ratio),
            r.status if len(r.status) <= 60 else r.status[:57] + "...",
        )
        for r in records
    ]
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    )
