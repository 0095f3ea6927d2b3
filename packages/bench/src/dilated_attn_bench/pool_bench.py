"""``pool``: what each buffer pool costs, what it holds, and what it does to an attention forward.

Every registered pool (``dilated_attn.registry``) runs the same measurements:

- a microbenchmark of an acquire/release pair that hits (a warm buffer of the same bucket), beside
  ``torch.empty`` of the same shape, the allocation a pool replaces;
- a replayed workload of attention workspaces of mixed lengths, several held at once, under a byte
  budget that forces evictions; the pool's ``stats()`` are read while the last leases are still held,
  so that fragmentation ``1 - requested / reserved`` is the rounding and idle waste of a live pool;
- the raw ledgers alone, no torch: ``PythonLedger`` and, with ``dilated-attn-pool`` installed, the
  Rust ledger called from Python and timed inside Rust (``Ledger.time_pairs``, each call taking the
  mutex); targets: the Rust pool's pair at most 0.7x the Python pool's, the Rust ledger's pair
  <= 250 ns inside Rust;
- unless ``--no-attention``: ``dilated_attention(..., backend=<a backend that takes a pool>, pool=...)``
  with no pool and with each pool, on one fixed length and on lengths varying call to call: time per
  forward, the most bytes each pool held, and on CUDA the caching allocator's allocations per forward
  and the peak allocated bytes; targets: with a pool at most 1 % slower on the fixed length, fewer
  allocations on varying ones.

Timings are medians over rounds whose order rotates (``timing.interleaved``).
"""

from __future__ import annotations

import platform
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from dilated_attn import dilated_attention
from dilated_attn.pool import BufferPool, PythonLedger
from dilated_attn.registry import available_pools, get_backend, get_pool

from dilated_attn_bench.memory import MB
from dilated_attn_bench.report import fmt
from dilated_attn_bench.timing import interleaved, mean_ns, wall_ms

NO_POOL = "torch.empty (no pool)"
PATTERN = ([2048, 4096, 8192], [1, 2, 4])
CPU_PATTERN = ([512, 1024, 2048], [1, 2, 4])


def _rust_ledger() -> Any:
    """The Rust ledger class, or ``None`` without ``dilated-attn-pool`` (its rows are then left out)."""
    try:
        from dilated_attn_pool import _pool_rs
    except ImportError:
        return None
    return _pool_rs.Ledger


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
    """Benchmark every registered pool (or ``names``), then the ``torch.empty`` reference.

    The pairs of every pool and of ``torch.empty`` are timed in interleaved rounds.
    """
    probe = shapes[0]
    failed: dict[str, str] = {}
    pools: dict[str, BufferPool] = {}
    for name in names if names is not None else available_pools():
        try:
            pools[name] = get_pool(name).factory(budget_bytes=budget_bytes)
        except Exception as exc:  # noqa: BLE001 - a broken pool is a row, not a crash
            failed[name] = f"failed: {type(exc).__name__}: {exc}"[:300]

    def pair_block(pool: BufferPool) -> Callable[[], float]:
        def pair() -> None:
            pool.release(pool.acquire(probe, torch.float32, device))

        return lambda: mean_ns(pair, pairs)

    blocks = {name: pair_block(pool) for name, pool in pools.items()}
    blocks[NO_POOL] = lambda: mean_ns(lambda: torch.empty(probe, dtype=torch.float32, device=device), pairs)
    for name, block in blocks.items():
        # One pool failing its pair must not take the others' timings with it.
        try:
            block()
        except Exception as exc:  # noqa: BLE001
            failed[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
    timings = interleaved({n: b for n, b in blocks.items() if n not in failed}, rounds)

    results = []
    for name in [*(names if names is not None else available_pools())]:
        if name in failed:
            results.append(PoolResult(name, failed[name]))
            continue
        try:
            stats = replay(
                get_pool(name).factory(budget_bytes=budget_bytes), shapes, device, steps=steps, held=held
            )
        except Exception as exc:  # noqa: BLE001
            results.append(PoolResult(name, f"failed: {type(exc).__name__}: {exc}"[:300]))
            continue
        t = timings[name]
        results.append(PoolResult(name, "ok", t.median_ms, t.p10_ms, t.p90_ms, stats, fragmentation(stats)))
    t = timings[NO_POOL]
    results.append(PoolResult(NO_POOL, "ok", t.median_ms, t.p10_ms, t.p90_ms))
    return results


def raw_ledger_pairs(pairs: int, rounds: int) -> dict[str, Any]:
    """ns per acquire+release on the ledgers alone: Python's, and Rust's from Python and inside Rust."""
    ledgers: dict[str, Any] = {"python": PythonLedger()}
    rust = _rust_ledger()
    if rust is not None:
        ledgers["rust"] = rust()

    def call_block(ledger: Any) -> Callable[[], float]:
        def pair() -> None:
            buffer_id, serial, _ = ledger.acquire(0, 0, 4096)
            ledger.release(buffer_id, serial)

        return lambda: mean_ns(pair, pairs)

    blocks = {f"{name} (called from Python)": call_block(ledger) for name, ledger in ledgers.items()}
    if rust is not None:
        inner = rust()
        blocks["rust (inside Rust)"] = lambda: inner.time_pairs(0, 0, 4096, pairs * 10) / (pairs * 10)
    return {"ns_per_pair": {name: t.median_ms for name, t in interleaved(blocks, rounds).items()}}


def _allocations(device: torch.device) -> int:
    return int(torch.cuda.memory_stats(device)["allocation.all.allocated"]) if device.type == "cuda" else 0


def check_backend(backend: str) -> str | None:
    """Why ``backend`` cannot run the attention study (it must take a pool), or ``None``."""
    try:
        takes_pool = get_backend(backend).capabilities.pool
    except ValueError as exc:
        return str(exc)
    return None if takes_pool else f"--backend={backend!r} does not take a pool (no capability pool=True)"


def attention(
    device: torch.device,
    dtype: torch.dtype,
    lengths: list[int],
    calls: int,
    rounds: int,
    budget_bytes: int,
    backend: str,
) -> dict[str, Any]:
    """Forward passes with no pool and with each pool, on ``calls`` lengths drawn from ``lengths``."""
    heads, dim = (8, 64) if device.type == "cuda" else (4, 32)
    segments, dilations = PATTERN if device.type == "cuda" else CPU_PATTERN
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = {
        n: [torch.randn(1, n, heads, dim, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]
        for n in sorted(set(lengths))
    }
    rng = random.Random(0)
    sequence = [rng.choice(lengths) for _ in range(calls)]

    def make(name: str) -> Callable[[], BufferPool | None]:
        return lambda: get_pool(name).factory(budget_bytes=budget_bytes)

    factories: dict[str, Callable[[], BufferPool | None]] = {"no pool": lambda: None}
    factories.update({name: make(name) for name in available_pools()})
    variants = {name: make() for name, make in factories.items()}

    def forward(n: int, pool: BufferPool | None) -> None:
        q, k, v = inputs[n]
        dilated_attention(q, k, v, segments, dilations, backend=backend, pool=pool)

    def block(pool: BufferPool | None) -> Callable[[], float]:
        def all_calls() -> None:
            for n in sequence:
                forward(n, pool)

        return lambda: wall_ms(all_calls, device) / calls

    with torch.no_grad():
        for pool in variants.values():
            for n in inputs:
                forward(n, pool)  # warm every length: kernels, allocator, one miss per bucket
        ms = interleaved({name: block(pool) for name, pool in variants.items()}, rounds)
        rows: dict[str, dict[str, Any]] = {}
        for name, pool in variants.items():
            row: dict[str, Any] = {"ms_per_forward": ms[name].median_ms}
            if device.type == "cuda":
                # A fresh pool, so that its misses count as allocations and what it keeps counts
                # toward the peak, as it would in a process that starts using a pool.
                fresh = factories[name]()
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base, before = torch.cuda.memory_allocated(device), _allocations(device)
                for n in sequence:
                    forward(n, fresh)
                torch.cuda.synchronize(device)
                row["allocations_per_forward"] = (_allocations(device) - before) / calls
                row["peak_bytes_over_baseline"] = torch.cuda.max_memory_allocated(device) - base
                del fresh
            if pool is not None:
                row["pool_stats"] = pool.stats()
            rows[name] = row
    if device.type == "cuda":
        no_pool_peak = rows["no pool"]["peak_bytes_over_baseline"]
        for row in rows.values():
            row["peak_over_no_pool"] = (
                row["peak_bytes_over_baseline"] / no_pool_peak if no_pool_peak else None
            )
    return {
        "lengths": lengths,
        "calls": calls,
        "shape": f"(1, n, {heads}, {dim})",
        "pattern": [segments, dilations],
        "variants": rows,
    }


def attention_study(
    device: torch.device, *, calls: int, rounds: int, budget_bytes: int, backend: str
) -> dict[str, Any]:
    """The fixed-length and varying-length attention runs (bf16 on CUDA, fp32 on a CPU)."""
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    fixed, varying = (
        ([32768], [16384, 20480, 24576, 28672, 32768])
        if on_cuda
        else ([4096], [2048, 2560, 3072, 3584, 4096])
    )
    calls = calls or (40 if on_cuda else 15)
    return {
        "backend": backend,
        "dtype": str(dtype),
        "fixed": attention(device, dtype, fixed, calls, rounds, budget_bytes, backend),
        "varying": attention(device, dtype, varying, calls, rounds, budget_bytes, backend),
    }


def results_json(
    device: torch.device,
    results: Sequence[PoolResult],
    shapes: Sequence[tuple[int, ...]],
    ledgers: dict[str, Any],
    attention_runs: dict[str, Any] | str,
) -> dict[str, Any]:
    """Everything measured, as ``--out`` writes it."""
    ns = {
        ("torch.empty" if r.pool == NO_POOL else r.pool): r.pair_ns for r in results if r.pair_ns is not None
    }
    pair: dict[str, Any] = {"shape": list(shapes[0]), "dtype": str(torch.float32), "ns_per_pair": ns}
    if "rust" in ns and "python" in ns:
        pair["rust_over_python"] = ns["rust"] / ns["python"]
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rust_pool": _rust_ledger() is not None,
        "protocol_pair": pair,
        "pool_status": {r.pool: r.status for r in results},
        "memory_report": {
            r.pool: {"stats": r.stats, "fragmentation": r.fragmentation}
            for r in results
            if r.stats is not None
        },
        "raw_ledger_pair": ledgers,
        "attention": attention_runs,
    }


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
    python = next((r.pair_ns for r in results if r.pool == "python"), None)
    rust = next((r.pair_ns for r in results if r.pool == "rust"), None)
    if python and rust:
        lines += ["", f"rust / python pair = {rust / python:.2f} (target <= 0.70)"]
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


def render_ledgers(ledgers: dict[str, Any]) -> str:
    lines = ["| Ledger pair (no torch) | ns/pair |", "|---|---|"]
    lines += [f"| {name} | {ns:,.0f} |" for name, ns in ledgers["ns_per_pair"].items()]
    return "\n".join([*lines, "", "Target: rust (inside Rust) <= 250 ns."])


def render_attention(study: dict[str, Any] | str) -> str:
    if isinstance(study, str):
        return f"Attention: {study}"
    lines = []
    for kind in ("fixed", "varying"):
        block = study[kind]
        base = block["variants"]["no pool"]["ms_per_forward"]
        lines += [
            f"Attention forward ({study['backend']}), {kind} lengths {block['lengths']}, "
            f"{block['shape']} {study['dtype']}:",
            "",
            "| Variant | ms/fwd | vs no pool | allocs/fwd | peak MiB | pool MiB | hits | misses |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in block["variants"].items():
            stats = row.get("pool_stats")
            peak = row.get("peak_bytes_over_baseline")
            cells = (
                name,
                f"{row['ms_per_forward']:.2f}",
                f"{row['ms_per_forward'] / base:.3f}",
                fmt(row.get("allocations_per_forward"), ".1f"),
                fmt(None if peak is None else peak / 2**20, ".0f"),
                fmt(None if stats is None else stats["peak_reserved_bytes"] / 2**20, ".1f"),
                "n/a" if stats is None else str(stats["hits"]),
                "n/a" if stats is None else str(stats["misses"]),
            )
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()
