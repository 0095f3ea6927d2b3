"""``compare`` reads two runs back and names speedups and regressions; ``pool`` reports every pool."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from dilated_attn.pool import STATS_KEYS
from dilated_attn_bench import pool_bench
from dilated_attn_bench.cli import main
from dilated_attn_bench.compare import compare
from dilated_attn_bench.records import Record, read_json, write_json


def _record(
    name: str, seq_len: int, time_ms: float | None, fwd_bwd_ms: float | None, status: str = "ok"
) -> Record:
    return Record(
        implementation=name,
        kind="dilated",
        preset="p",
        batch=1,
        seq_len=seq_len,
        heads=2,
        head_dim=16,
        dtype="fp32",
        mode="longnet",
        causal=False,
        segment_lengths=[64],
        dilation_rates=[1],
        device="cpu",
        status=status,
        time_ms=time_ms,
        fwd_bwd_ms=fwd_bwd_ms,
    )


def test_compare_names_speedups_regressions_and_status_changes(tmp_path, capsys):
    a = [
        _record("sdpa", 256, 10.0, 30.0),
        _record("sdpa", 512, 20.0, 60.0),
        _record("triton", 256, 5.0, 15.0),
        _record("ring", 256, None, None, "failed: out of memory"),
        _record("gone", 256, 1.0, 1.0),
        _record("flex", 256, 3.0, 9.0),
        _record("mixed", 256, 3.0, 9.0),
        _record("math", 256, None, None, "skipped: SDPA has no cudnn kernel on cpu"),
    ]
    b = [
        _record("sdpa", 256, 5.0, 15.0),  # 2x faster
        _record("sdpa", 512, 20.4, 60.0),  # within noise
        _record("triton", 256, None, None, "failed: out of memory"),
        _record("ring", 256, 8.0, 20.0),
        _record("new", 256, 1.0, 1.0),
        _record("flex", 256, None, None, "skipped: needs torchrun"),
        _record("mixed", 256, 1.5, 18.0),
        _record("math", 256, 2.0, 2.0),
    ]
    changes, only_a, only_b = compare(a, b)
    verdicts = {(c.b.implementation, c.b.seq_len): c for c in changes}
    assert verdicts["sdpa", 256].speedup == pytest.approx(2.0)
    assert verdicts["sdpa", 256].fwd_bwd_speedup == pytest.approx(2.0)
    assert verdicts["sdpa", 256].verdict == "faster"
    assert verdicts["sdpa", 512].verdict == "same"
    assert verdicts["triton", 256].verdict == "regression: failed: out of memory"
    assert verdicts["ring", 256].verdict == "fixed (was failed: out of memory)"
    # Skips change what was measured, not how fast it runs.
    assert verdicts["flex", 256].verdict == "not measured in B (skipped: needs torchrun)"
    assert verdicts["math", 256].verdict.startswith("now measured (was skipped")
    assert verdicts["mixed", 256].verdict == "mixed"
    assert [r.implementation for r in only_a] == ["gone"] and [r.implementation for r in only_b] == ["new"]

    slower = [dataclasses.replace(r, time_ms=r.time_ms * 1.5) if r.ok else r for r in a]
    (regressed, *_), _, _ = compare(a, slower)
    assert regressed.verdict == "regression" and regressed.speedup == pytest.approx(1 / 1.5)

    write_json(tmp_path / "a.json", a, {})
    write_json(tmp_path / "b.json", b, {})
    assert read_json(tmp_path / "a.json")[0] == a
    # triton ran out of memory in B, and "mixed" is slower in one phase: both gate (exit status 1).
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    out = capsys.readouterr().out
    assert "| sdpa b=1, n=256, h=2, d=16, fp32, longnet | 10 | 5 | 2.00x |" in out
    assert "7 shared rows: 1 faster, 1 regressions, 1 mixed." in out
    assert "Only in A: gone b=1" in out and "Only in B: new b=1" in out


def test_pool_report_covers_every_registered_pool(register_plugin):
    class BrokenPool:
        def __init__(self, budget_bytes=None):
            raise RuntimeError("no storage here")

    register_plugin("pools", pools={"t-broken": BrokenPool})
    shapes = pool_bench.workspace_shapes([64, 96, 128], heads=2, head_dim=8)
    budget = 2 * 128 * 2 * 8 * 4  # room for two of the largest workspaces: the replay must evict
    results = {
        r.pool: r
        for r in pool_bench.bench_pools(
            torch.device("cpu"), budget_bytes=budget, shapes=shapes, pairs=20, rounds=3, steps=60, held=3
        )
    }
    assert set(results) >= {"python", "t-broken", pool_bench.NO_POOL}
    assert results["t-broken"].status == "failed: RuntimeError: no storage here"

    python = results["python"]
    assert python.status == "ok" and python.pair_p10_ns <= python.pair_ns <= python.pair_p90_ns
    assert set(python.stats) == set(STATS_KEYS)
    assert python.stats["hits"] + python.stats["misses"] == 60
    assert python.stats["evictions"] > 0 and python.stats["hits"] > 0
    # Three leases are held when the stats are read, so the pool holds at least what they asked for.
    assert python.stats["requested_bytes"] >= 3 * 64 * 2 * 8 * 4
    assert python.fragmentation == pytest.approx(
        1 - python.stats["requested_bytes"] / python.stats["reserved_bytes"]
    )
    assert 0 <= python.fragmentation < 1


def test_pool_command_prints_both_tables(capsys):
    assert (
        main(
            [
                "pool",
                "--device",
                "cpu",
                "--seq",
                "64,128",
                "--heads",
                "2",
                "--dim",
                "8",
                "--pairs",
                "20",
                "--steps",
                "20",
                "--budget-mb",
                "1",
                "--no-attention",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| Pool | Acquire+release (ns, median) |" in out
    assert (
        "| Pool | Buffers | Hits | Misses | Evictions | Bytes held (MB) | Peak held (MB) | Fragmentation |"
        in out
    )
    assert "| python |" in out and pool_bench.NO_POOL in out


def test_pool_command_writes_the_json_of_every_study(tmp_path, capsys):
    out = tmp_path / "deep" / "pool.json"
    argv = ["pool", "--device", "cpu", "--seq", "64,128", "--heads", "2", "--dim", "8", "--pairs", "20"]
    argv += ["--repeats", "1", "--steps", "20", "--calls", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Ledger pair (no torch) | ns/pair |" in printed and "Attention forward (sdpa), fixed" in printed
    report = json.loads(out.read_text())
    assert {"device", "torch", "python", "rust_pool", "protocol_pair", "raw_ledger_pair", "attention"} <= set(
        report
    )
    pair = report["protocol_pair"]["ns_per_pair"]
    assert {"python", "torch.empty"} <= set(pair) and all(ns > 0 for ns in pair.values())
    assert "python (called from Python)" in report["raw_ledger_pair"]["ns_per_pair"]
    if report["rust_pool"]:
        assert "rust (inside Rust)" in report["raw_ledger_pair"]["ns_per_pair"]
        assert report["protocol_pair"]["rust_over_python"] > 0
    for kind in ("fixed", "varying"):
        variants = report["attention"][kind]["variants"]
        assert "no pool" in variants and "python" in variants
        assert all(row["ms_per_forward"] > 0 for row in variants.values())
        assert variants["python"]["pool_stats"]["misses"] > 0
