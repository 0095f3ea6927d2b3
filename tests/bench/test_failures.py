"""A failing, wrong, too large or unrunnable row is reported as such, and the run goes on."""

from __future__ import annotations

import socket

import pytest
import torch
from dilated_attn import DilationPattern, get_backend
from dilated_attn_bench.cli import main
from dilated_attn_bench.distributed import World
from dilated_attn_bench.presets import Workload
from dilated_attn_bench.records import read_json
from dilated_attn_bench.registered import registered_backends
from dilated_attn_bench.runner import Settings, describe_failure, measure, run

SETTINGS = Settings(
    device=torch.device("cpu"), warmup=1, repeats=2, budget_s=0.2, backward=True, dense_max_seq=4096
)
SMALL = Workload("test", 1, 96, 2, 8, torch.float32, (32, 64), (1, 2))


def _core(q, k, v, pattern, request):
    return get_backend("sdpa").fn(q, k, v, pattern, request)


def _raises(exc):
    def fn(*args, **kwargs):
        raise exc

    return fn


def _wrong_offset(q, k, v, pattern, request):
    # Head j uses offset (j + 1) % r instead of j % r: a plausible bug the oracle must catch.
    out, lse = _core(q.roll(1, 2), k.roll(1, 2), v.roll(1, 2), pattern, request)
    return out.roll(-1, 2), lse.roll(-1, 2)


def _dropped_pattern(q, k, v, pattern, request):
    fewer = DilationPattern(pattern.segment_lengths[:-1], pattern.dilation_rates[:-1])
    return _core(q, k, v, fewer, request)


def _mean_merge(q, k, v, pattern, request):
    # Averaging the per-pattern outputs instead of weighting them by their softmax denominators.
    parts = [
        _core(q, k, v, DilationPattern([w], [r]), request)
        for w, r in zip(pattern.segment_lengths, pattern.dilation_rates)
    ]
    return sum(o for o, _ in parts) / len(parts), parts[0][1]


def _fails_in_backward(q, k, v, pattern, request):
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    out, lse = _core(q, k, v, pattern, request)
    return Boom.apply(out), lse


def _by_name(records):
    return {r.implementation: r for r in records}


def test_failures_become_rows_and_the_run_continues(register_plugin):
    cpu = {"devices": ("cpu",), "auto": False}
    register_plugin(
        "failing-backends",
        backends={
            "t-oom": (
                _raises(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")),
                cpu,
            ),
            "t-error": (_raises(ValueError("segment_lengths=[3] is bad\nsecond line")), cpu),
            "t-wrong": (_wrong_offset, cpu),
            "t-dropped": (_dropped_pattern, cpu),
            "t-mean": (_mean_merge, cpu),
            "t-backward-oom": (_fails_in_backward, cpu),
            "t-ok": (_core, cpu),
        },
    )
    impls = [i for i in registered_backends() if i.name.startswith("t-")]
    seen = []
    records = run(impls, [SMALL], SETTINGS, World(), progress=False, on_record=seen.append)
    assert seen == records
    rows = _by_name(records)

    assert rows["t-oom"].status == "failed: out of memory"
    assert rows["t-oom"].time_ms is None and "failed in the forward" in rows["t-oom"].notes
    assert rows["t-error"].status == "failed: ValueError: segment_lengths=[3] is bad"
    wrong = rows["t-wrong"]
    assert wrong.status.startswith("failed: wrong result (forward rel. error") and wrong.time_ms > 0
    assert wrong.rel_error > 1e-2
    for name in ("t-dropped", "t-mean"):
        assert rows[name].status.startswith("failed: wrong result"), rows[name]
    # The forward was measured; only the forward+backward failed.
    backward = rows["t-backward-oom"]
    assert backward.status == "failed: out of memory" and backward.time_ms > 0 and backward.fwd_bwd_ms is None
    assert (
        rows["t-ok"].status == "ok" and rows["t-ok"].rel_error < 1e-5 and rows["t-ok"].grad_rel_error < 1e-4
    )


def test_impossible_size_fails_fast_without_allocating(tmp_path, capsys):
    # 2**31 tokens x 2 heads x 16 dims of fp32 is 256 GiB per tensor: more than this machine holds.
    # No row completes, so the run reports everything and still exits 1.
    assert (
        main(
            [
                "run",
                "--device",
                "cpu",
                "--seq",
                str(2**31),
                "--heads",
                "2",
                "--dim",
                "16",
                "--backends",
                "sdpa,segment-ceiling,dense-sdpa-flash",
                "--output",
                str(tmp_path),
            ]
        )
        == 1
    )
    assert "no row completed (2 failed, 1 skipped of 3)" in capsys.readouterr().err
    rows = _by_name(read_json(tmp_path / "results.json")[0])
    assert rows["sdpa"].status == "failed: out of memory"
    assert any("inputs alone need" in note for note in rows["sdpa"].notes)
    assert rows["segment-ceiling"].status == "failed: out of memory"
    assert rows["dense-sdpa-flash"].status.startswith("skipped: dense attention at n=2,147,483,648")
    # The small correctness check still ran, and passed.
    assert rows["sdpa"].rel_error < 1e-5


def test_real_allocation_failure_is_out_of_memory():
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as exc:
        assert describe_failure(exc) == "out of memory"
    else:
        pytest.skip("this allocator accepted 4 EiB")


def test_capabilities_and_requirements_are_skips(register_plugin):
    register_plugin(
        "picky-backends",
        backends={
            "t-ring": (_core, {"distributed": True, "auto": False}),
            "t-needs": (_core, {"options": ("pattern",), "requires": ("pattern",), "auto": False}),
            "t-bf16": (_core, {"dtypes": (torch.bfloat16,), "auto": False}),
            "t-no-bwd": (_core, {"backward": False, "auto": False}),
        },
    )
    impls = [i for i in registered_backends() if i.name.startswith("t-")]
    rows = _by_name(run(impls, [SMALL], SETTINGS, World(), progress=False))
    assert rows["t-ring"].status == "skipped: needs torchrun"
    assert rows["t-needs"].status == "skipped: needs pattern"
    assert rows["t-bf16"].status.startswith("skipped: dtype torch.float32 not in")
    no_bwd = rows["t-no-bwd"]
    assert no_bwd.status == "ok" and no_bwd.fwd_bwd_ms is None and no_bwd.grad_rel_error is None
    assert "forward+backward not timed: backend declares backward=False" in no_bwd.notes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_backend_runs_under_a_process_group(register_plugin, monkeypatch):
    """A one-rank gloo group stands in for torchrun: the distributed row runs and is checked."""
    import torch.distributed as dist
    from dilated_attn_bench.distributed import init_world, shutdown

    for key, value in {
        "WORLD_SIZE": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }.items():
        monkeypatch.setenv(key, value)
    seen_world = []

    def ring(q, k, v, pattern, request):
        seen_world.append(dist.get_world_size())
        return _core(q, k, v, pattern, request)

    register_plugin("ring-like", backends={"t-ring": (ring, {"distributed": True, "auto": False})})
    world, device = init_world(torch.device("cpu"))
    try:
        assert world.launched and world.size == 1 and world.is_main
        (impl,) = [i for i in registered_backends() if i.name == "t-ring"]
        record = measure(impl, SMALL, SETTINGS, world)
    finally:
        shutdown(world)
    assert not dist.is_initialized()
    assert record.status == "ok" and record.world_size == 1 and record.rel_error < 1e-5
    assert seen_world and set(seen_world) == {1}


def test_check_length_is_odd_and_spans_a_partial_segment():
    from dilated_attn_bench.accuracy import check_size
    from dilated_attn_bench.presets import expand

    (longnet,) = expand(["longnet-256k"])
    (quick,) = expand(["cpu-quick"])
    assert check_size(longnet, torch.device("cuda"), World()) == 3073
    assert check_size(longnet, torch.device("cpu"), World()) == 1024
    assert check_size(quick, torch.device("cpu"), World()) == 769
    assert check_size(quick, torch.device("cpu"), World(size=2)) == 768
    assert check_size(SMALL, torch.device("cpu"), World()) == 49
