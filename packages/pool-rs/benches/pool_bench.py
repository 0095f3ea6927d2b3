"""What the buffer pools cost and what they buy, measured in one process.

1. Protocol pair: ``pool.release(pool.acquire(shape, dtype, device))`` for ``PythonBufferPool`` and
   ``RustBufferPool`` (plus ``torch.empty`` of the same shape, the allocation a pool replaces).
   Target: the Rust pair at most 0.7x the Python pair.
2. Raw ledger pair: acquire+release on the ledgers alone, no torch: called from Python for both, and
   timed inside Rust (``Ledger.time_pairs``, each call taking the mutex). Target: <= 250 ns in Rust.
3. Attention forward ``dilated_attention(..., backend="sdpa", pool=pool)`` (a backend that takes a
   pool: "auto" prefers "triton" on CUDA, which does not) with no pool, the Python pool and the
   Rust pool, on one fixed sequence length and on lengths varying call to call: time per forward,
   the most bytes each pool held (``peak_reserved_bytes``), and on CUDA the caching allocator's
   allocation count per forward (``memory_stats()["allocation.all.allocated"]``) and the peak
   allocated bytes over the run.
   Targets: with a pool, at most 1 % slower on the fixed length, fewer allocations on varying ones.

Usage (CPU or GPU; 1 to 4 minutes on a shared 2-core CPU, well under 2 minutes on an H100):

    PYTHONPATH=packages/core/src python3 packages/pool-rs/benches/pool_bench.py --out pool.json

Every timing is the median of ``--repeats`` blocks, the pools' blocks interleaved so that drift
on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from dilated_attn import dilated_attention, get_backend
from dilated_attn.pool import BufferPool, PythonBufferPool, PythonLedger

try:
    import dilated_attn_pool
    from dilated_attn_pool import _pool_rs
except ImportError:  # the Rust pool is optional: its rows are then left out
    dilated_attn_pool = None  # type: ignore[assignment]
    _pool_rs = None  # type: ignore[assignment]

PATTERN = ([2048, 4096, 8192], [1, 2, 4])
CPU_PATTERN = ([512, 1024, 2048], [1, 2, 4])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(blocks: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of ``repeats`` runs of each block, the blocks' order rotating every round."""
    names = list(blocks)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(blocks[name]())
    return {name: statistics.median(values) for name, values in samples.items()}


def _pool_factories(budget_bytes: int | None) -> dict[str, Callable[[], BufferPool]]:
    factories: dict[str, Callable[[], BufferPool]] = {"python": lambda: PythonBufferPool(budget_bytes)}
    if dilated_attn_pool is not None:
        factories["rust"] = lambda: dilated_attn_pool.RustBufferPool(budget_bytes)
    return factories


def protocol_pairs(device: torch.device, pairs: int, repeats: int) -> dict[str, Any]:
    shape, dtype = (4, 1024, 64), torch.float32
    pools = {name: make() for name, make in _pool_factories(None).items()}

    def pool_block(pool: BufferPool) -> Callable[[], float]:
        def run() -> float:
            acquire, release = pool.acquire, pool.release
            start = time.perf_counter_ns()
            for _ in range(pairs):
                release(acquire(shape, dtype, device))
            return (time.perf_counter_ns() - start) / pairs

        return run

    def empty_block() -> float:
        start = time.perf_counter_ns()
        for _ in range(pairs):
            torch.empty(shape, dtype=dtype, device=device)
        _sync(device)
        return (time.perf_counter_ns() - start) / pairs

    blocks = {name: pool_block(pool) for name, pool in pools.items()}
    blocks["torch.empty"] = empty_block
    for block in blocks.values():
        block()  # warm: the first miss, the caching allocator, the places cache
    ns = _interleaved(blocks, repeats)
    result: dict[str, Any] = {"shape": list(shape), "dtype": str(dtype), "ns_per_pair": ns}
    if "rust" in ns:
        result["rust_over_python"] = ns["rust"] / ns["python"]
    return result


def raw_ledger_pairs(pairs: int, repeats: int) -> dict[str, Any]:
    ledgers: dict[str, Any] = {"python": PythonLedger()}
    if _pool_rs is not None:
        ledgers["rust"] = _pool_rs.Ledger()

    def call_block(ledger: Any) -> Callable[[], float]:
        def run() -> float:
            acquire, release = ledger.acquire, ledger.release
            start = time.perf_counter_ns()
            for _ in range(pairs):
                buffer_id, serial, _ = acquire(0, 0, 4096)
                release(buffer_id, serial)
            return (time.perf_counter_ns() - start) / pairs

        return run

    blocks = {f"{name} (called from Python)": call_block(ledger) for name, ledger in ledgers.items()}
    if _pool_rs is not None:
        inner = _pool_rs.Ledger()
        blocks["rust (inside Rust)"] = lambda: inner.time_pairs(0, 0, 4096, pairs * 10) / (pairs * 10)
    for block in blocks.values():
        block()
    return {"ns_per_pair": _interleaved(blocks, repeats)}


def _allocations(device: torch.device) -> int:
    return int(torch.cuda.memory_stats(device)["allocation.all.allocated"]) if device.type == "cuda" else 0


def attention(
    device: torch.device,
    dtype: torch.dtype,
    lengths: list[int],
    calls: int,
    repeats: int,
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
    factories: dict[str, Callable[[], BufferPool | None]] = {"no pool": lambda: None}
    factories.update(_pool_factories(budget_bytes))
    variants = {name: make() for name, make in factories.items()}

    def forward(n: int, pool: BufferPool | None) -> None:
        q, k, v = inputs[n]
        dilated_attention(q, k, v, segments, dilations, backend=backend, pool=pool)

    def block(pool: BufferPool | None) -> Callable[[], float]:
        def run() -> float:
            _sync(device)
            start = time.perf_counter()
            for n in sequence:
                forward(n, pool)
            _sync(device)
            return (time.perf_counter() - start) / calls * 1e3

        return run

    with torch.no_grad():
        for pool in variants.values():
            for n in inputs:
                forward(n, pool)  # warm every length: kernels, allocator, one miss per bucket
        ms = _interleaved({name: block(pool) for name, pool in variants.items()}, repeats)
        rows: dict[str, dict[str, Any]] = {}
        for name, pool in variants.items():
            row: dict[str, Any] = {"ms_per_forward": ms[name]}
            if device.type == "cuda":
                # A fresh pool, so that its misses count as allocations and what it keeps counts
                # toward the peak, as it would in a process that starts using a pool.
                fresh = factories[name]()
                _sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base, before = torch.cuda.memory_allocated(device), _allocations(device)
                for n in sequence:
                    forward(n, fresh)
                _sync(device)
                row["allocations_per_forward"] = (_allocations(device) - before) / calls
                row["peak_bytes_over_baseline"] = torch.cuda.max_memory_allocated(device) - base
                del fresh
            if pool is not None:
                row["pool_stats"] = pool.stats()
            rows[name] = row
    if device.type == "cuda":
        no_pool_peak = rows["no pool"]["peak_bytes_over_baseline"]
        for row in rows.values():
            row["peak_over_no_pool"] = row["peak_bytes_over_baseline"] / no_pool_peak
    return {
        "lengths": lengths,
        "calls": calls,
        "shape": f"(1, n, {heads}, {dim})",
        "pattern": [segments, dilations],
        "variants": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="path of the JSON results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", type=int, default=20_000, help="acquire+release pairs per timed block")
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per measurement (median)")
    parser.add_argument("--calls", type=int, default=0, help="forwards per attention block (0: by device)")
    parser.add_argument("--budget-mb", type=float, default=512.0, help="budget_bytes of the attention pools")
    parser.add_argument("--no-attention", action="store_true", help="only the pair and ledger timings")
    parser.add_argument(
        "--backend",
        default="sdpa",
        help="attention backend; it must take a pool (capability pool=True), which 'auto' may not pick",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if on_cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rust_pool": dilated_attn_pool is not None,
        "protocol_pair": protocol_pairs(device, args.pairs, args.repeats),
        "raw_ledger_pair": raw_ledger_pairs(args.pairs, args.repeats),
    }
    if not args.no_attention and not get_backend(args.backend).capabilities.extra.get("pool", False):
        parser.error(f"--backend={args.backend!r} does not take a pool (no capability pool=True)")
    if args.no_attention:
        results["attention"] = "skipped: --no-attention"
    else:
        dtype = torch.bfloat16 if on_cuda else torch.float32
        fixed, varying = (
            ([32768], [16384, 20480, 24576, 28672, 32768])
            if on_cuda
            else ([4096], [2048, 2560, 3072, 3584, 4096])
        )
        calls = args.calls or (40 if on_cuda else 15)
        budget = int(args.budget_mb * 2**20)
        results["attention"] = {
            "backend": args.backend,
            "dtype": str(dtype),
            "fixed": attention(device, dtype, fixed, calls, args.repeats, budget, args.backend),
            "varying": attention(device, dtype, varying, calls, args.repeats, budget, args.backend),
        }
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    _print_table(results)
    return 0


def _print_table(results: dict[str, Any]) -> None:
    print(f"device: {results['device']}  torch {results['torch']}  python {results['python']}")
    pair = results["protocol_pair"]
    print(f"\nprotocol pair, {tuple(pair['shape'])} {pair['dtype']}        ns/pair")
    for name, ns in pair["ns_per_pair"].items():
        print(f"  {name:<32}{ns:>10.0f}")
    if "rust_over_python" in pair:
        print(f"  rust / python = {pair['rust_over_python']:.2f}  (target <= 0.70)")
    print("\nraw ledger pair (no torch)              ns/pair")
    for name, ns in results["raw_ledger_pair"]["ns_per_pair"].items():
        print(f"  {name:<32}{ns:>10.0f}")
    print("  target: rust (inside Rust) <= 250")
    att = results["attention"]
    if isinstance(att, str):
        print(f"\nattention: {att}")
        return
    for kind in ("fixed", "varying"):
        block = att[kind]
        base = block["variants"]["no pool"]
        print(
            f"\nattention forward ({att['backend']}), {kind} lengths {block['lengths']}, "
            f"{block['shape']} {att['dtype']}"
        )
        header = ("variant", "ms/fwd", "vs none", "allocs/fwd", "peak MiB", "pool MiB", "hits", "misses")
        print("  " + header[0].ljust(10) + "".join(h.rjust(11) for h in header[1:]))
        for name, row in block["variants"].items():
            stats = row.get("pool_stats")
            allocs = row.get("allocations_per_forward")
            peak = row.get("peak_bytes_over_baseline")
            cells = (
                f"{row['ms_per_forward']:.2f}",
                f"{row['ms_per_forward'] / base['ms_per_forward']:.3f}",
                "-" if allocs is None else f"{allocs:.1f}",
                "-" if peak is None else f"{peak / 2**20:.0f}",
                "-" if stats is None else f"{stats['peak_reserved_bytes'] / 2**20:.1f}",
                "-" if stats is None else str(stats["hits"]),
                "-" if stats is None else str(stats["misses"]),
            )
            print("  " + name.ljust(10) + "".join(c.rjust(11) for c in cells))


if __name__ == "__main__":
    sys.exit(main())
