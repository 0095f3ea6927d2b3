"""``pool``: what a buffer pool costs per acquire/release, and how well it holds memory.

Every registered pool (``dilated_attn.registry``) runs the same two measurements:

- a microbenchmark of an acquire/release pair that hits (a warm buffer of the same bucket), beside
  ``torch.empty`` of the same shape, the allocation a pool replaces;
- a replayed workload of attention workspaces of mixed lengths, several held at once, under a byte
  budget that forces evictions; the pool's ``stats()`` are read while the last leases are still held,
  so that fragmentation ``1 - requested / reserved`` is the rounding and idle waste of a live pool.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from dilated_attn.pool import BufferPool
from dilated_attn.registry import available_pools, get_pool

from dilated_attn_bench.memory import MB
from dilated_attn_bench.report import fmt

NO_POOL = "torch.empty (no pool)"


@dataclass(frozen=True)
class PoolResult:
    """One pool's numbers; ``status`` is ``ok`` or ``failed: <reason>``."""

    pool: str
    status: str
    pair_ns: float | None = None
    pair_p10_ns: float | None = None
    pair_p90_ns: float | None = None
    stats: dict[str, int] | None = None
    fragmentation: float | None = None


def _time_pairs(pair: Callable[[], object], *, pairs: int, rounds: int) -> tuple[float, float, float]:
    """Median, p10 and p90 over ``rounds`` of the mean ns of ``pairs`` back-to-back calls."""
    pair()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(pairs):
            pair()
        samples.append((time.perf_counter_ns() - start) / pairs)
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), deciles[0], deciles[-1]


def workspace_shapes(seq_lens: Sequence[int], heads: int, head_dim: int) -> list[tuple[int, ...]]:
    """The ``(1, n, h, d)`` float32 workspaces a dilated forward asks its pool for."""
    return [(1, n, heads, head_dim) for n in seq_lens]


def replay(
    pool: BufferPool,
    shapes: Sequence[tuple[int, ...]],
    device: torch.device,
    *,
    steps: int,
    held: int,
    seed: int = 0,
) -> dict[str, int]:
    """Acquire ``steps`` random workspaces, the last ``held`` kept leased; stats read before their release."""
    rng = random.Random(seed)
    live: deque[Any] = deque()
    for _ in range(steps):
        live.append(pool.acquire(rng.choice(shapes), torch.float32, device))
        if len(live) > held:
            pool.release(live.popleft())
    stats = dict(pool.stats())
    while live:
        pool.release(live.popleft())
    return stats


def fragmentation(stats: dict[str, int]) -> float | None:
    """``1 - requested / reserved``: the share of held bytes that no live request asked for."""
    reserved = stats.get("reserved_bytes", 0)
    return 1.0 - stats.get("requested_bytes", 0) / reserved if reserved else None


def bench_pools(
    device: torch.device,
    *,
    budget_bytes: int,
    shapes: Sequence[tuple[int, ...]],
    pairs: int = 2000,
    rounds: int = 7,
    steps: int = 200,
    held: int = 4,
    names: Sequence[str] | None = None,
) -> list[PoolResult]:
    """Benchmark every registered pool (or ``names``), then the ``torch.empty`` reference."""
    probe = shapes[0]
    results = []
    for name in names if names is not None else available_pools():
        try:
            pool = get_pool(name).factory(budget_bytes=budget_bytes)

            def pair(pool: Any = pool) -> None:
                pool.release(pool.acquire(probe, torch.float32, device))

            median, p10, p90 = _time_pairs(pair, pairs=pairs, rounds=rounds)
            stats = replay(
                get_pool(name).factory(budget_bytes=budget_bytes), shapes, device, steps=steps, held=held
            )
        except Exception as exc:  # noqa: BLE001 - a broken pool is a row, not a crash
            results.append(PoolResult(name, f"failed: {type(exc).__name__}: {exc}"[:300]))
            continue
        results.append(PoolResult(name, "ok", median, p10, p90, stats, fragmentation(stats)))

    median, p10, p90 = _time_pairs(
        lambda: torch.empty(probe, dtype=torch.float32, device=device), pairs=pairs, rounds=rounds
    )
    results.append(PoolResult(NO_POOL, "ok", median, p10, p90))
    return results


def render(
    results: Sequence[PoolResult],
    *,
    device: torch.device,
    budget_bytes: int,
    shapes: Sequence[tuple[int, ...]],
    steps: int,
    held: int,
) -> str:
    """Two Markdown tables: acquire/release cost, then the memory-pool report."""
    lines = [
        f"Pools on {device}, budget {budget_bytes / MB:,.0f} MB, probe shape {shapes[0]} float32.",
        "",
        "| Pool | Acquire+release (ns, median) | p10–p90 (ns) | Status |",
        "|---|---|---|---|",
    ]
    for r in results:
        spread = f"{fmt(r.pair_p10_ns, '.0f')}–{fmt(r.pair_p90_ns, '.0f')}"
        lines.append(f"| {r.pool} | {fmt(r.pair_ns, ',.0f')} | {spread} | {r.status} |")
    lines += [
        "",
        f"Memory-pool report after {steps} acquires of {len(shapes)} workspace sizes, {held} held at a time "
        "(stats read with the last leases held):",
        "",
        "| Pool | Buffers | Hits | Misses | Evictions | Bytes held (MB) | Peak held (MB) | Fragmentation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.stats is None:
            continue
        s = r.stats
        lines.append(
            f"| {r.pool} | {s['num_buffers']} | {s['hits']} | {s['misses']} | {s['evictions']} "
            f"| {s['reserved_bytes'] / MB:,.1f} | {s['peak_reserved_bytes'] / MB:,.1f} "
            f"| {fmt(r.fragmentation, '.3f')} |"
        )
    return "\n".join(lines)
