"""The GPU benchmark script runs end to end at a toy size on the CPU (its ``--device cpu`` smoke mode)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "packages" / "sparse" / "benches" / "sparse_bench.py"


def test_bench_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("sparse_bench", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    status = bench.main(
        [
            "--device", "cpu", "--n", "200", "--heads", "2", "--head-dim", "8", "--block-size", "16",
            "--densities", "0.25", "--kinds", "local_window,dilated_blocks", "--check-n", "50",
            "--budget", "0", "--out", str(out), "--md", str(md),
        ]
    )  # fmt: skip
    assert status == 0
    report = json.loads(out.read_text())
    assert [c["passed"] for c in report["check"]] == [True, True]
    assert "math" in report["dense"] and report["ratio_reference"] == "math"
    assert [r["kind"] for r in report["sparse"]] == ["local_window", "dilated_blocks"]
    for row in report["sparse"]:
        assert 0 < row["density"] <= 1 and row["fwd"]["ms"] > 0 and row["fwdbwd_ratio"] > 0
    assert "| local_window(window=" in md.read_text()
