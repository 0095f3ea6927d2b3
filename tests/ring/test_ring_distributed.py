"""``ring_dilated_attention`` on gloo processes against the float64 oracle.

One launch per suite of ``ring_worker.py`` and world size runs every case of the suite; the tests
below judge its report. "oracle" runs at 2 and 4 processes; "fused" (the local runs on the fused
kernels, under Triton's interpreter) at 2 and 4; "worlds" at 2, 3, 4 and 8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("dilated_attn_ring")

import ring_worker  # noqa: E402
from dilated_attn.testing import TOLERANCES  # noqa: E402

WORLDS = (2, 4)
SCALING_WORLDS = (2, 3, 4, 8)
LAUNCH_TIMEOUT_S = 240
# Triton's interpreter runs every kernel program in Python.
INTERPRETED_TIMEOUT_S = 900


def _launch(world: int, tmp: Path, suite: str = "oracle") -> dict[str, Any]:
    store, report = tmp / "store", tmp / "report.json"
    env = dict(os.environ, WORLD_SIZE=str(world), OMP_NUM_THREADS="1", DILATED_ATTN_LOAD_PLUGINS="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    # Only the "fused" suite runs the kernels (interpreted); the others take the gather path on CPU.
    env.pop("TRITON_INTERPRET", None)
    if suite == "fused":
        env["TRITON_INTERPRET"] = "1"
    timeout = INTERPRETED_TIMEOUT_S if suite == "fused" else LAUNCH_TIMEOUT_S
    procs = [
        subprocess.Popen(
            [sys.executable, ring_worker.__file__, str(store), str(report), suite],
            env=dict(env, RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    codes = [proc.returncode for proc in procs]
    if any(codes) or not report.exists():
        pytest.fail(f"ring workers exited with {codes}:\n" + "\n".join(logs)[-6000:])
    return json.loads(report.read_text())


@pytest.fixture(scope="module", params=WORLDS, ids=[f"world{w}" for w in WORLDS])
def report(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, dict[str, Any]]:
    world = request.param
    return world, _launch(world, tmp_path_factory.mktemp(f"ring-world{world}"))


def _all_case_names() -> list[str]:
    return sorted(set(ring_worker.cases(2)) | set(ring_worker.cases(4)))


@pytest.fixture(scope="module", params=WORLDS, ids=[f"world{w}" for w in WORLDS])
def fused_report(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, dict[str, Any]]:
    pytest.importorskip("triton")
    world = request.param
    return world, _launch(world, tmp_path_factory.mktemp(f"ring-fused-world{world}"), "fused")


@pytest.fixture(scope="module", params=SCALING_WORLDS, ids=[f"world{w}" for w in SCALING_WORLDS])
def worlds_report(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, dict[str, Any]]:
    world = request.param
    return world, _launch(world, tmp_path_factory.mktemp(f"ring-worlds-world{world}"), "worlds")


@pytest.mark.parametrize("name", _all_case_names())
def test_matches_oracle(report: tuple[int, dict[str, Any]], name: str) -> None:
    world, results = report
    if name not in ring_worker.cases(world):
        pytest.skip(f"{name} runs only on other world sizes")
    _check_errors(results[name])


@pytest.mark.parametrize("name", sorted(ring_worker.fused_cases(2)))
def test_local_runs_on_the_fused_kernels_match_oracle(
    fused_report: tuple[int, dict[str, Any]], name: str
) -> None:
    _, results = fused_report
    result = results[name]
    _check_errors(result)
    # Every local run of every rank went through the kernels, forward and backward.
    assert result["local_runs"] > 0
    assert result["fused_calls"] == [result["local_runs"], result["local_runs"]]


@pytest.mark.parametrize("name", sorted(ring_worker.world_cases(2)))
def test_world_sizes_two_to_eight_match_oracle(worlds_report: tuple[int, dict[str, Any]], name: str) -> None:
    _, results = worlds_report
    _check_errors(results[name])


def _check_errors(result: dict[str, Any]) -> None:
    assert "failure" not in result, result.get("failure")
    fwd_tol, grad_tol = TOLERANCES[getattr(torch, result["case"]["dtype"])]
    errors = result["errors"]
    for key in ("out", "lse"):
        assert errors[key] <= fwd_tol, f"{key} relative error {errors[key]:.3e} > {fwd_tol:g}"
    for key in ("dq", "dk", "dv"):
        assert errors[key] <= grad_tol, f"{key} relative error {errors[key]:.3e} > {grad_tol:g}"
    # The comparison can fail: the oracle with causality flipped is far from these outputs.
    assert result["control"] > 1e-3


@pytest.mark.parametrize("name", sorted(ring_worker.ERROR_CASES))
def test_disagreeing_or_invalid_ranks_all_raise_the_same_error(
    report: tuple[int, dict[str, Any]], name: str
) -> None:
    world, results = report
    raised = results[f"error:{name}"]["raised"]
    assert len(raised) == world
    kind, pieces = ring_worker.ERROR_CASES[name]
    first_kind, first_message = raised[0]
    assert first_kind == kind, first_message
    for piece in pieces:
        assert piece.format(last=world - 1) in first_message, first_message
    assert "rank" in first_message
    # The same error on every rank: none of them hung (the group's timeout is 10 s) or went on.
    assert all(entry == raised[0] for entry in raised), raised


def test_multihead_module_with_ring_backend(report: tuple[int, dict[str, Any]]) -> None:
    _, results = report
    result = results["module"]
    assert "failure" not in result, result.get("failure")
    fwd_tol, grad_tol = TOLERANCES[torch.float64]
    assert result["errors"]["out"] <= fwd_tol
    assert result["errors"]["dx"] <= grad_tol
    assert result["errors"]["dW_q"] <= grad_tol


@pytest.mark.parametrize("label", sorted(ring_worker.MESH_CASES))
def test_two_dimensional_mesh_splits_the_sequence_along_one_dimension(
    report: tuple[int, dict[str, Any]], label: str
) -> None:
    world, results = report
    if world != 4:
        pytest.skip("the 2 x 2 (dp, sp) mesh needs 4 processes")
    fwd_tol, grad_tol = TOLERANCES[torch.float64]
    for rank, per_rank in enumerate(results["mesh"]):
        assert "failure" not in per_rank, per_rank.get("failure")
        errors = per_rank[label]["errors"]
        for key, tol in (
            ("out", fwd_tol),
            ("lse", fwd_tol),
            ("dq", grad_tol),
            ("dk", grad_tol),
            ("dv", grad_tol),
        ):
            assert errors[key] <= tol, f"rank {rank}: {key} relative error {errors[key]:.3e} > {tol:g}"
        assert per_rank[label]["control"] > 1e-3, "the other replica's rows must differ"


@pytest.mark.parametrize("label", sorted(ring_worker.BAD_GROUPS))
def test_group_that_names_no_group_is_refused(report: tuple[int, dict[str, Any]], label: str) -> None:
    world, results = report
    if world != 4:
        pytest.skip("the 2 x 2 (dp, sp) mesh needs 4 processes")
    kind, message = ring_worker.BAD_GROUPS[label]
    for per_rank in results["mesh"]:
        assert "failure" not in per_rank, per_rank.get("failure")
        got_kind, got_message = per_rank[f"bad:{label}"]
        assert got_kind == kind and message in got_message, (got_kind, got_message)
