"""The kernel study's backward-variant section, with the GPU timings replaced by fakes (the real
measurement needs CUDA): every variant is set for its own call and restored afterwards."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def test_backward_variants_set_and_restore_each_setting(monkeypatch, capsys):
    from dilated_attn.kernels import backward
    from dilated_attn_bench import kernel

    monkeypatch.setenv(backward.DQ_ENV, "recompute")
    seen = []

    def fake_throughput(n, mode, backend, *, grad, causal, heads, head_dim):
        setting = (os.environ[backward.DQ_ENV], backward.HEAD_MAJOR_STATS)
        seen.append((mode, causal, head_dim, *setting))
        # reductions 10 % faster, head-major 5 % faster: ratios must come out in that order
        tflops = 100.0 * (1.1 if setting[0] == "atomic" else 1.0) * (1.05 if setting[1] else 1.0)
        return {"ms": 1.0, "tflops": tflops, "status": "ok"}

    monkeypatch.setattr(kernel, "throughput", fake_throughput)
    monkeypatch.setattr(kernel, "ceiling", lambda *a, **k: {"ms": 1.0, "tflops": 200.0, "status": "ok"})
    results = kernel.backward_variants(1 << 20, runs=2)

    full_rows = [row for row in kernel.TARGET_ROWS if row[5] == 1]
    assert list(results["rows"]) == [row[0] for row in full_rows]
    assert len(seen) == len(full_rows) * 2 * len(kernel.BACKWARD_VARIANTS)
    assert {s[3:] for s in seen} == set(kernel.BACKWARD_VARIANTS)
    ratios = results["rows"]["exact"]["ratios"]
    assert ratios["dQ reductions, LSE head-major"] == pytest.approx(100 * 1.1 * 1.05 / 200)
    assert ratios["dQ recomputed, LSE (b, n, h)"] == pytest.approx(0.5)
    # the process's settings are back as they were
    assert os.environ[backward.DQ_ENV] == "recompute" and backward.HEAD_MAJOR_STATS is True

    kernel.print_backward_variants(results)
    table = capsys.readouterr().out
    assert "| exact | 0.525 | 0.500 | 0.578 | 0.550 |" in table
    assert table.count("\n| ") == 1 + len(full_rows)


def test_variant_studies_are_exclusive(usage_error):
    usage_error(["kernel", "--out", "k.json", "--variants", "--backward-variants"], "not allowed with")


_COMPILE_ALL = """
from dilated_attn.kernels.tuning import _CANDIDATES
from dilated_attn_bench.compile_check import KERNELS, compile_one
for name, flags, ones in (("forward", (), True), ("dkdv", ("DQ_BULK",), False), ("dq", (), True)):
    result = compile_one(KERNELS[name], "bf16", 64, _CANDIDATES[name][64][0], 90, ones, flags)
    assert result["wgmma"] and result["registers"] > 0, (name, result)
    print(name, "ok")
"""


def test_compile_check_compiles_for_sm90_without_a_gpu():
    # Each kernel's argument list differs (the backward's LSE head stride, the dQ accumulator): the
    # check must build every kernel's signature, with integer arguments specialised to 1 too. In a
    # process of its own: the interpreter tests of this suite turn the kernels into interpreted ones.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_ALL], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["forward", "ok", "dkdv", "ok", "dq", "ok"]
