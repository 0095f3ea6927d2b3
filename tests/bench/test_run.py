"""End to end: ``dilated-attn-bench run`` on tiny shapes writes a report that reads back correctly."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from dilated_attn import get_backend
from dilated_attn_bench.cli import main
from dilated_attn_bench.records import FIELDS, read_json

REQUIRED = (
    "implementation",
    "batch",
    "seq_len",
    "heads",
    "head_dim",
    "dtype",
    "time_ms",
    "fwd_bwd_ms",
    "memory_mb",
    "throughput_tok_s",
    "tflops",
    "status",
)
TINY = [
    "--device",
    "cpu",
    "--seq",
    "250",
    "--heads",
    "2",
    "--dim",
    "16",
    "--segments",
    "64,128",
    "--dilations",
    "1,2",
    "--repeats",
    "2",
]


def _sdpa_times(factor: float):
    """A backend that is the core "sdpa" backend scaled by ``factor`` (1: correct, else wrong)."""

    def fn(q, k, v, pattern, request):
        out, lse = get_backend("sdpa").fn(q, k, v, pattern, request)
        return out * factor, lse

    return fn


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run shared by the tests below: core backends, baselines and an in-test plugin."""
    from dilated_attn import hookimpl
    from dilated_attn.registry import get_registry

    class Plugin:
        @hookimpl
        def dilated_attn_register_attention(self, register):
            register("plugin-ok", _sdpa_times(1.0), devices=("cpu",), auto=False)

    out = tmp_path_factory.mktemp("run")
    registry = get_registry()
    handle = registry.register(Plugin(), name="bench-test-plugin")
    try:
        assert main(["run", *TINY, "--output", str(out)]) == 0
    finally:
        registry.unregister(handle)
    return out


def test_writes_every_file(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {
        "report.md",
        "results.json",
        "results.csv",
        "time_vs_seq_len.png",
        "memory_vs_seq_len.png",
    } <= names
    assert "results.partial.jsonl" not in names  # only a run cut short leaves it
    for png in tiny_run.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_json_records_have_the_fields_and_honest_values(tiny_run):
    payload = json.loads((tiny_run / "results.json").read_text())
    for key in ("date", "git_commit", "hardware", "torch", "parameters"):
        assert key in payload["meta"]
    records = {r["implementation"]: r for r in payload["records"]}
    for record in records.values():
        assert set(REQUIRED) <= set(record)
        assert (record["batch"], record["seq_len"], record["heads"], record["head_dim"], record["dtype"]) == (
            1,
            250,
            2,
            16,
            "fp32",
        )
        # The CPU allocator keeps no peak counter: memory is unknown, never a made-up 0.
        assert record["memory_mb"] is None and record["fwd_bwd_memory_mb"] is None

    assert {"reference", "sdpa", "plugin-ok", "segment-ceiling", "dense-sdpa-flash"} <= set(records)
    for name in ("reference", "sdpa", "plugin-ok"):
        r = records[name]
        assert r["status"] == "ok", r
        assert r["kind"] == "dilated"
        assert r["time_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["time_p10_ms"] <= r["time_ms"] <= r["time_p90_ms"]
        assert r["throughput_tok_s"] == pytest.approx(250 / (r["time_ms"] * 1e-3))
        assert r["rel_error"] < 1e-5 and r["grad_rel_error"] < 1e-4 and r["error_seq_len"] == 3 * 64 // 2 + 1
        assert r["ceiling_ratio"] == pytest.approx(r["tflops"] / records["segment-ceiling"]["tflops"])
    # Useful FLOPs of SPEC §3 for n=250 (W = 64, 128; r = 1, 2), forward+backward = 3.5x.
    sdpa = records["sdpa"]
    flops = sum(4 * 2 * (250 / w) * (w / r) ** 2 * 16 for w, r in ((64, 1), (128, 2)))
    assert sdpa["flops"] == pytest.approx(flops)
    assert sdpa["tflops"] == pytest.approx(flops / (sdpa["time_ms"] * 1e-3) / 1e12)
    assert sdpa["fwd_bwd_tflops"] == pytest.approx(3.5 * flops / (sdpa["fwd_bwd_ms"] * 1e-3) / 1e12)

    assert records["dense-sdpa-flash"]["flops"] == 4 * 2 * 250**2 * 16
    assert records["dense-sdpa-flash"]["rel_error"] is None
    assert records["dense-sdpa-cudnn"]["status"] == "skipped: SDPA has no cudnn kernel on cpu"
    assert records["dense-flex"]["status"] == "skipped: FlexAttention is only fused (compiled) on CUDA here"


def test_csv_and_markdown_carry_the_same_rows(tiny_run):
    records, _ = read_json(tiny_run / "results.json")
    with (tiny_run / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == FIELDS
    assert [r["implementation"] for r in rows] == [r.implementation for r in records]
    sdpa = next(r for r in rows if r["implementation"] == "sdpa")
    assert float(sdpa["time_ms"]) > 0 and sdpa["memory_mb"] == ""

    report = (tiny_run / "report.md").read_text()
    for heading in (
        "**Date**",
        "**Git commit**",
        "**Hardware**",
        "torch",
        "## Parameters",
        "## Summary",
        "## Detailed results",
    ):
        assert heading in report
    header = next(line for line in report.splitlines() if line.startswith("| Implementation |"))
    for column in (
        "Batch",
        "Seq Len",
        "Heads",
        "Time (ms)",
        "Fwd+Bwd (ms)",
        "Memory (MB)",
        "Throughput (tok/s)",
        "TFLOP/s",
        "Ceiling Ratio",
        "Rel. Error",
        "Status",
    ):
        assert f"| {column}" in header
    assert "x the segment ceiling" in report
    table_rows = [line for line in report.splitlines() if line.startswith("| `")]
    assert len(table_rows) == len(records)
    assert "n/a" in next(line for line in table_rows if line.startswith("| `sdpa`"))


def test_backends_filter_and_unknown_name(tmp_path, usage_error):
    args = [
        "--backends",
        "sdpa,segment-*,ref*",
        "--exclude",
        "reference",
        "--no-backward",
        "--commit",
        "abc1234",
    ]
    assert main(["run", *TINY, *args, "--output", str(tmp_path)]) == 0
    records, meta = read_json(tmp_path / "results.json")
    assert (
        meta["git_commit"] == "abc1234" and "**Git commit**: abc1234" in (tmp_path / "report.md").read_text()
    )
    assert [r.implementation for r in records] == ["segment-ceiling", "sdpa"]
    assert all(r.fwd_bwd_ms is None and r.status == "ok" for r in records)
    assert records[1].grad_rel_error is None and records[1].rel_error < 1e-5
    usage_error(
        ["run", *TINY, "--backends", "no-such-backend", "--output", str(tmp_path)], "match no implementation"
    )
    usage_error(["run", *TINY, "--exclude", "no-such-backend", "--output", str(tmp_path)], "--exclude")


def test_non_positive_counts_are_refused(usage_error):
    for flag in ("--repeats", "--heads", "--warmup"):
        usage_error(["run", *TINY, flag, "0"], f"argument {flag}: '0' must be a positive int")


def test_bad_shape_flags_are_refused(tmp_path, usage_error):
    usage_error(["run", *TINY, "--dilations", "1,256", "--output", str(tmp_path)], "dilation_rates")
    usage_error(["run", "--preset", "longnet-2m", "--output", str(tmp_path)], "longnet-2m", "not a preset")


def test_default_cpu_run_is_cpu_quick():
    from dilated_attn_bench.presets import CPU_DEFAULT_PRESETS, expand

    (workload,) = expand(CPU_DEFAULT_PRESETS)
    assert (workload.batch, workload.seq_len, workload.heads, workload.head_dim, workload.dtype) == (
        1,
        4096,
        4,
        32,
        torch.float32,
    )
