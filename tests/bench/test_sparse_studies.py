"""``sparse`` and ``flex-tuning`` run end to end at a toy size on the CPU (their ``--device cpu`` smoke mode)."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("dilated_attn_sparse")

from dilated_attn_bench.cli import main  # noqa: E402


def test_bench_smoke(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    status = main(
        [
            "sparse", "--device", "cpu", "--n", "200", "--heads", "2", "--head-dim", "8", "--block-size", "16",
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


def test_flex_tuning_smoke(tmp_path, monkeypatch):
    from dilated_attn_bench import flex_tuning as tuning

    attention = tuning.block_sparse_attention

    def rejecting(*args, kernel_options=None, **kwargs):
        if kernel_options and "NOT_AN_OPTION" in kernel_options:
            raise ValueError("NOT_AN_OPTION is not a kernel option")
        return attention(*args, kernel_options=kernel_options, **kwargs)

    # A candidate that fails is recorded with its error, and the sweep goes on.
    monkeypatch.setattr(tuning, "block_sparse_attention", rejecting)
    out, md = tmp_path / "tuning.json", tmp_path / "tuning.md"
    extra = [{"NOT_AN_OPTION": 1}, {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}]
    status = main(
        [
            "flex-tuning", "--device", "cpu", "--max-candidates", "1", "--extra-options", json.dumps(extra),
            "--no-combine", "--budget", "0", "--out", str(out), "--md", str(md),
        ]
    )  # fmt: skip
    assert status == 0
    report = json.loads(out.read_text())
    assert report["ratio_reference"] == "math" and report["config"]["n"] == 1024
    expected = [
        (kind, group, options)
        for kind in ("local_window", "dilated_blocks", "random_blocks")
        for group, options in (
            ("fwd", tuning.FWD_CANDIDATES[0]),
            ("bwd", tuning.BWD_CANDIDATES[0]),
            ("extra", extra[0]),
            ("extra", extra[1]),
        )
    ]
    records = report["records"]
    assert [(r["kind"], r["group"], r["options"]) for r in records] == expected
    failed = [r for r in records if "NOT_AN_OPTION" in r["options"]]
    assert len(failed) == 3 and all(r["status"] == "error" and "ValueError" in r["error"] for r in failed)
    for r in records:
        if r in failed:
            continue
        assert r["status"] == "ok", r.get("error")
        assert 0 < r["density"] <= 1 and math.isfinite(r["fwd_ratio"]) and r["fwd_ratio"] > 0
        if r["group"] != "fwd":
            assert math.isfinite(r["fwdbwd_ratio"]) and r["fwdbwd_ratio"] > 0
        # On the CPU the options are ignored: every candidate computes the defaults' results.
        assert max(r["err_vs_default"].values()) < 1e-6 and not r["suspect"]
    assert {(b["kind"], b["timing"]) for b in report["best"]} == {
        (kind, timing)
        for kind in ("local_window", "dilated_blocks", "random_blocks")
        for timing in ("fwd", "fwdbwd")
    }
    assert "**best fwd**" in md.read_text() and "**best fwd+bwd**" in md.read_text()


def test_flex_tuning_time_limit(tmp_path):
    out = tmp_path / "tuning.json"
    status = main(
        [
            "flex-tuning", "--device", "cpu", "--kinds", "local_window", "--candidates", "fwd", "--max-seconds", "0",
            "--budget", "0", "--out", str(out),
        ]
    )  # fmt: skip
    assert status == 0
    records = json.loads(out.read_text())["records"]
    assert len(records) == 8 and {r["status"] for r in records} == {"skipped: time limit"}
