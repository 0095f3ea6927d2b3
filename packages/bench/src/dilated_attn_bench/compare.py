"""``compare A.json B.json``: the speedup of B over A for every row the two runs share.

A row is slower or faster only when its median moved past ``threshold`` *and* past the spread
measured in both runs: B's p10 above A's p90 (slower), or B's p90 below A's p10 (faster). Rows
whose spread is unknown (an older results file) are judged by the threshold alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dilated_attn_bench.records import SKIPPED, Record
from dilated_attn_bench.report import NA, fmt

# Below this relative change a difference is read as noise.
DEFAULT_THRESHOLD = 0.05


@dataclass(frozen=True)
class Change:
    """One shared row: ``speedup = A time / B time`` (above 1: B is faster)."""

    a: Record
    b: Record
    speedup: float | None
    fwd_bwd_speedup: float | None
    verdict: str


def _speedup(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _phase_change(a: Record, b: Record, prefix: str, threshold: float) -> int | None:
    """-1 slower, +1 faster, 0 within the threshold or the spread, ``None`` when not measured in both."""
    a_ms, b_ms = getattr(a, f"{prefix}ms"), getattr(b, f"{prefix}ms")
    if a_ms is None or not b_ms:
        return None
    speedup = a_ms / b_ms
    a_lo, a_hi = getattr(a, f"{prefix}p10_ms"), getattr(a, f"{prefix}p90_ms")
    b_lo, b_hi = getattr(b, f"{prefix}p10_ms"), getattr(b, f"{prefix}p90_ms")
    if speedup < 1 - threshold and (a_hi is None or b_lo is None or b_lo > a_hi):
        return -1
    if speedup > 1 + threshold and (a_lo is None or b_hi is None or b_hi < a_lo):
        return 1
    return 0


def _verdict(a: Record, b: Record, threshold: float) -> str:
    if a.ok and not b.ok:
        # A skip is a change of coverage (flags, capabilities), not of speed.
        return (
            f"not measured in B ({b.status})" if b.status.startswith(SKIPPED) else f"regression: {b.status}"
        )
    if not a.ok and b.ok:
        return f"now measured (was {a.status})" if a.status.startswith(SKIPPED) else f"fixed (was {a.status})"
    if not a.ok:
        return "neither ok"
    known = [_phase_change(a, b, prefix, threshold) for prefix in ("time_", "fwd_bwd_")]
    slower = -1 in known
    faster = 1 in known
    if slower and faster:
        return "mixed"
    if slower:
        return "regression"
    return "faster" if faster else "same"


def compare(
    a: Sequence[Record], b: Sequence[Record], *, threshold: float = DEFAULT_THRESHOLD
) -> tuple[list[Change], list[Record], list[Record]]:
    """Changes for the rows in both runs (in B's order), then the rows only in A and only in B."""
    by_key = {r.key(): r for r in a}
    b_keys = {r.key() for r in b}
    changes = []
    for rb in b:
        ra = by_key.get(rb.key())
        if ra is None:
            continue
        speedups = (_speedup(ra.time_ms, rb.time_ms), _speedup(ra.fwd_bwd_ms, rb.fwd_bwd_ms))
        changes.append(Change(ra, rb, *speedups, _verdict(ra, rb, threshold)))
    only_a = [r for r in a if r.key() not in b_keys]
    only_b = [r for r in b if r.key() not in by_key]
    return changes, only_a, only_b


def is_regression(change: Change) -> bool:
    """Slower past the spread in some phase ("mixed" included), or ok in A and failing in B."""
    return change.verdict.startswith("regression") or change.verdict == "mixed"


def _row_name(r: Record) -> str:
    return f"{r.implementation} {r.describe()}"


def render(changes: Sequence[Change], only_a: Sequence[Record], only_b: Sequence[Record]) -> str:
    """A Markdown table of the changes, then the unmatched rows."""
    lines = [
        "| Row | A fwd (ms) | B fwd (ms) | Speedup fwd | A fwd+bwd (ms) | B fwd+bwd (ms) | Speedup fwd+bwd "
        "| Verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in changes:
        lines.append(
            f"| {_row_name(c.b)} | {fmt(c.a.time_ms, '.3g')} | {fmt(c.b.time_ms, '.3g')} "
            f"| {fmt(c.speedup)}x | {fmt(c.a.fwd_bwd_ms, '.3g')} | {fmt(c.b.fwd_bwd_ms, '.3g')} "
            f"| {fmt(c.fwd_bwd_speedup)}x | {c.verdict} |".replace(f"{NA}x", NA)
        )
    regressions = sum(is_regression(c) and c.verdict != "mixed" for c in changes)
    faster = sum(c.verdict == "faster" for c in changes)
    mixed = sum(c.verdict == "mixed" for c in changes)
    lines += ["", f"{len(changes)} shared rows: {faster} faster, {regressions} regressions, {mixed} mixed."]
    for label, rows in (("Only in A", only_a), ("Only in B", only_b)):
        if rows:
            lines += ["", f"{label}: " + ", ".join(_row_name(r) for r in rows)]
    return "\n".join(lines)
