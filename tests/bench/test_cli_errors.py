"""Every bad argument of every command ends in one argparse-style line and exit status 2, before
anything is measured; a run where no row completes exits 1; ``compare`` gates on regressions past
the measured spread; a report on too few samples says so; ``--help`` needs no torch."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from dilated_attn_bench.cli import main
from dilated_attn_bench.records import Record, write_json
from dilated_attn_bench.report import headline

TINY = [
    "--device",
    "cpu",
    "--seq",
    "100",
    "--heads",
    "2",
    "--dim",
    "8",
    "--segments",
    "32,64",
    "--dilations",
    "1,2",
]
BAD_POSITIVE = ["nan", "inf", "-inf", "-1", "0", "abc", ""]


@pytest.mark.parametrize(
    "flag", ["--phase-budget", "--repeats", "--warmup", "--heads", "--dim", "--dense-max-seq"]
)
@pytest.mark.parametrize("value", BAD_POSITIVE)
def test_run_numbers_must_be_finite_and_positive(usage_error, flag, value):
    usage_error(["run", *TINY, flag, value], f"argument {flag}:")


@pytest.mark.parametrize("flag", ["--seq", "--batch", "--segments", "--dilations"])
@pytest.mark.parametrize("value", ["0", "4096,-2", ",", "a,b", "nan", "1.5"])
def test_run_lists_must_hold_positive_ints(usage_error, flag, value):
    usage_error(["run", *TINY, flag, value], f"argument {flag}:")


@pytest.mark.parametrize(
    "selection, needle",
    [
        (["--exclude", "*"], "leave no implementation"),
        (["--backends", "sdpa", "--exclude", "sdpa"], "leave no implementation"),
        (["--backends", "segment-*", "--exclude", "seg*"], "leave no implementation"),
        (["--backends", "no-such-*"], "match no implementation"),
        (["--exclude", "sdpa,typo"], "'typo'"),
        (["--backends", ","], "names nothing"),
    ],
)
def test_selections_that_leave_nothing_are_refused(usage_error, tmp_path, selection, needle):
    usage_error(["run", *TINY, *selection, "--output", str(tmp_path / "out")], needle)
    assert not (tmp_path / "out" / "report.md").exists()


def _unwritable(tmp_path):
    plain = tmp_path / "plain-file"
    plain.write_text("x")
    # A folder below a regular file, the regular file itself, and a kernel file system: none takes a report.
    return {"below a file": plain / "sub", "a file": plain, "proc": "/proc/version/out"}


@pytest.mark.parametrize("case", ["below a file", "a file", "proc"])
def test_run_output_must_be_writable(usage_error, tmp_path, case):
    usage_error(["run", *TINY, "--output", str(_unwritable(tmp_path)[case])], "--output=")


@pytest.mark.parametrize("case", ["below a file", "proc", "a folder"])
def test_pool_out_must_be_a_writable_file(usage_error, tmp_path, case):
    path = tmp_path if case == "a folder" else _unwritable(tmp_path)[case]
    usage_error(["pool", "--device", "cpu", "--no-attention", "--out", str(path)], "--out=")


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1", "1.5", "x"])
def test_compare_threshold_is_a_fraction(usage_error, tmp_path, value):
    usage_error(["compare", "a.json", "b.json", "--threshold", value], "argument --threshold:")


def _record(name="sdpa", time_ms=10.0, p10=9.0, p90=11.0, repeats=5, status="ok", **extra):
    return Record(
        implementation=name,
        kind="dilated",
        preset="p",
        batch=1,
        seq_len=256,
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
        time_p10_ms=p10,
        time_p90_ms=p90,
        repeats=repeats,
        **extra,
    )


BAD_FILES = {
    "bad JSON": ("{not json", "not JSON"),
    "empty": ("", "not JSON"),
    "an object without records": ("{}", "not a results file"),
    "records not a list": ('{"records": 5}', "not a results file"),
    "a number": ("3", "not a results file"),
    "a record that is no object": ('{"records": [1]}', "record 0 is int"),
    "a record lacking keys": ('{"records": [{"implementation": "sdpa"}]}', "record 0 lacks kind"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
@pytest.mark.parametrize("side", ["a", "b"])
def test_compare_bad_files(usage_error, tmp_path, case, side):
    good = tmp_path / "good.json"
    write_json(good, [_record()], {})
    bad = tmp_path / "bad.json"
    text, needle = BAD_FILES[case]
    bad.write_text(text)
    argv = ["compare", str(bad), str(good)] if side == "a" else ["compare", str(good), str(bad)]
    usage_error(argv, f"{side}=", needle)


@pytest.mark.parametrize("case", ["missing", "a folder"])
def test_compare_unreadable_files(usage_error, tmp_path, case):
    good = tmp_path / "good.json"
    write_json(good, [_record()], {})
    path = tmp_path / "nowhere.json" if case == "missing" else tmp_path
    usage_error(["compare", str(path), str(good)], "a=", "cannot read it")


@pytest.mark.parametrize(
    "b, verdict, status",
    [
        # 20 % slower but inside A's spread (B's p10 below A's p90): noise.
        (dict(time_ms=12.0, p10=10.5, p90=13.0), "same", 0),
        # 20 % slower and past the spread: a regression, exit 1.
        (dict(time_ms=12.0, p10=11.5, p90=12.5), "regression", 1),
        # Past the spread but inside the threshold: noise.
        (dict(time_ms=10.3, p10=10.2, p90=10.4, repeats=20), "same", 0),
        (dict(time_ms=8.0, p10=7.5, p90=8.5), "faster", 0),
        (dict(time_ms=8.0, p10=7.5, p90=9.5), "same", 0),
        (dict(time_ms=None, p10=None, p90=None, status="failed: out of memory"), "regression: failed", 1),
        # No spread recorded (an older results file): the threshold alone decides.
        (dict(time_ms=12.0, p10=None, p90=None), "regression", 1),
    ],
)
def test_compare_gates_only_past_the_spread(tmp_path, capsys, b, verdict, status):
    write_json(tmp_path / "a.json", [_record()], {})
    write_json(tmp_path / "b.json", [_record(**b)], {})
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == status
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| sdpa"))
    assert row.rstrip(" |").split("| ")[-1].startswith(verdict), row


def _rated(name, repeats, fwd_bwd_repeats=None, ratio=0.8):
    record = _record(
        name,
        repeats=repeats,
        tflops=ratio if name != "segment-ceiling" else 1.0,
        ceiling_ratio=ratio if name != "segment-ceiling" else 1.0,
        fwd_bwd_ms=30.0 if fwd_bwd_repeats else None,
        fwd_bwd_repeats=fwd_bwd_repeats,
    )
    return dataclasses.replace(record, kind="baseline") if name == "segment-ceiling" else record


@pytest.mark.parametrize(
    "rows, few",
    [
        ([("segment-ceiling", 5, None), ("sdpa", 5, None)], None),
        ([("segment-ceiling", 20, 20), ("sdpa", 5, 7)], None),
        ([("segment-ceiling", 3, None), ("sdpa", 20, None)], 3),
        ([("segment-ceiling", 20, 20), ("sdpa", 20, 1)], 1),
        ([("segment-ceiling", 20, None), ("sdpa", 4, None)], 4),
    ],
)
def test_headline_says_when_samples_are_too_few(rows, few):
    records = [_rated(name, n, m) for name, n, m in rows]
    text = headline(records)
    if few is None:
        assert "**0.80x the segment ceiling**" in text and "Too few" not in text
    else:
        assert text.startswith(f"Too few samples for a measured ratio: some rows stand on {few} timed call")
        assert "**" not in text and "about 0.80x" in text


def _failing(exc):
    def fn(*args, **kwargs):
        raise exc

    return fn


@pytest.mark.parametrize(
    "backends",
    [
        {"t-error": ValueError("no")},
        {"t-error": ValueError("no"), "t-oom": torch.OutOfMemoryError("CUDA out of memory")},
    ],
)
def test_a_run_where_every_row_fails_exits_1(register_plugin, tmp_path, capsys, backends):
    cpu = {"devices": ("cpu",), "auto": False}
    register_plugin("all-failing", backends={name: (_failing(exc), cpu) for name, exc in backends.items()})
    argv = ["run", *TINY, "--repeats", "1", "--backends", ",".join(backends), "--output", str(tmp_path)]
    assert main(argv) == 1
    assert (
        f"no row completed ({len(backends)} failed, 0 skipped of {len(backends)})" in capsys.readouterr().err
    )
    assert (tmp_path / "report.md").exists()


def test_nan_phase_budget_is_refused_by_the_timer_too():
    from dilated_attn_bench.timing import time_calls

    for budget in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="budget_s"):
            time_calls(lambda: None, torch.device("cpu"), warmup=1, repeats=1, budget_s=budget)


@pytest.mark.parametrize(
    "command, module, needle",
    [
        (["sparse", "--out", "x.json"], "dilated_attn_sparse", "needs dilated-attn-sparse"),
        (["flex-tuning", "--out", "x.json"], "dilated_attn_sparse", "needs dilated-attn-sparse"),
        (["ring", "--out", "x.json"], "dilated_attn_ring", "needs dilated-attn-ring"),
        (["kernel", "--out", "x.json"], "triton", "needs triton"),
        (["compile-check"], "triton", "needs triton"),
    ],
)
def test_a_missing_optional_package_is_one_line(usage_error, monkeypatch, command, module, needle):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a)
    )
    usage_error(command, needle, "not installed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("command", [["kernel", "--out", "k.json"], ["ring", "--out", "r.json"]])
def test_gpu_studies_refuse_a_cpu_machine(usage_error, tmp_path, command):
    needs = "triton" if command[0] == "kernel" else "dilated_attn_ring"
    if importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not installed")
    usage_error([command[0], "--out", str(tmp_path / command[2])], "needs")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["kernel", "--out", "k.json", "--variant-tiles", "128,64,8"], "4 ints"),
        (["kernel", "--out", "k.json", "--variant-tiles", "128,64,8,0"], "positive int"),
        (["kernel", "--out", "k.json", "--n", "nan"], "argument --n:"),
        (["kernel", "--out", "k.json", "--longest", "0"], "argument --longest:"),
        (["compile-check", "--arch", "-90"], "argument --arch:"),
        (["sparse", "--out", "s.json", "--densities", "0,0.5"], "argument --densities:"),
        (["sparse", "--out", "s.json", "--densities", "1.5"], "(0, 1]"),
        (["sparse", "--out", "s.json", "--kinds", "local_window,ring"], "ring: not a pattern kind"),
        (["sparse", "--out", "s.json", "--budget", "nan"], "argument --budget:"),
        (["sparse", "--out", "s.json", "--kernel-options", "[1]"], "JSON object"),
        (["sparse", "--out", "s.json", "--kernel-options", "{bad"], "not JSON"),
        (["flex-tuning", "--out", "f.json", "--extra-options", "{}"], "JSON list of objects"),
        (["flex-tuning", "--out", "f.json", "--max-seconds", "-5"], "argument --max-seconds:"),
        (["flex-tuning", "--out", "f.json", "--kinds", "nope"], "not a pattern kind"),
        (["ring", "--out", "r.json", "--iters", "0"], "argument --iters:"),
        (["ring", "--out", "r.json", "--warmup", "inf"], "argument --warmup:"),
        (["ring", "--out", "r.json", "--longest", "0M"], ("argument --longest:", "positive token count")),
        (["ring", "--out", "r.json", "--longest", "4G"], ("argument --longest:", "'4G'")),
        (
            ["kernel", "--out", "k.json", "--sections", "targets,speed"],
            ("argument --sections:", "correctness"),
        ),
        (["kernel", "--out", "k.json", "--sections", ","], "argument --sections:"),
        (["kernel", "--out", "k.json", "--runs", "0"], "argument --runs:"),
        (["kernel", "--out", "k.json", "--n", "10000"], ("--n=10000", "multiple of 8192")),
        (["kernel", "--out", "k.json", "--longest", "8G"], "argument --longest:"),
        (["ring", "--out", "r.json", "--longest", "100K"], ("--longest", "multiples of the longest segment")),
        (["pool", "--budget-mb", "nan"], "argument --budget-mb:"),
        (["pool", "--pairs", "-3"], "argument --pairs:"),
        (["pool", "--seq", "64,,-1"], "argument --seq:"),
        (["pool", "--device", "cpu", "--backend", "no-such-backend"], "no-such-backend"),
    ],
)
def test_study_arguments(usage_error, argv, needle):
    needles = needle if isinstance(needle, tuple) else (needle,)
    usage_error(argv, *needles)


HEAVY = ("torch", "matplotlib", "dilated_attn", "numpy", "triton")


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["ring", "--help"], ["compare", "--help"]])
def test_help_imports_no_torch(argv):
    # The real entry point (``python -m dilated_attn_bench``), with the modules it loaded listed after.
    code = textwrap.dedent(
        f"""
        import runpy, sys
        sys.argv = ["dilated-attn-bench", *{argv!r}]
        try:
            runpy.run_module("dilated_attn_bench", run_name="__main__")
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        print("LOADED", sorted({{name.split(".")[0] for name in sys.modules}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: dilated-attn-bench" in result.stdout
    loaded = eval(result.stdout.rsplit("LOADED", 1)[1])
    assert not set(loaded) & set(HEAVY), sorted(set(loaded) & set(HEAVY))


def test_help_imports_no_torch_by_importtime():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dilated_attn_bench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "usage:" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines()}
    assert "dilated_attn_bench" in imported and not imported & set(HEAVY)


def test_cli_names_agree_with_the_tables():
    from dilated_attn_bench import choices, presets

    assert tuple(presets.PRESETS) == choices.PRESET_NAMES
    assert tuple(presets.DTYPES) == choices.DTYPE_NAMES
    assert set(presets.GPU_DEFAULT_PRESETS) | set(presets.CPU_DEFAULT_PRESETS) <= set(presets.PRESETS)


def test_records_read_back_with_extra_keys(tmp_path):
    path = tmp_path / "r.json"
    item = {**dataclasses.asdict(_record()), "from_a_later_version": 1}
    path.write_text(json.dumps({"meta": {}, "records": [item]}))
    write_json(tmp_path / "same.json", [_record()], {})
    assert main(["compare", str(path), str(tmp_path / "same.json")]) == 0
