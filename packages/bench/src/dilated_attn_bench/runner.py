"""The benchmark loop: every implementation on every workload, one record each, failures included."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from dilated_attn_bench.accuracy import measure_accuracy
from dilated_attn_bench.baselines import CEILING
from dilated_attn_bench.distributed import World, barrier, slowest
from dilated_attn_bench.implementations import KIND_DILATED, Implementation
from dilated_attn_bench.memory import MB, PeakMemory, device_capacity_bytes, peak_memory, release
from dilated_attn_bench.presets import Workload, dtype_name
from dilated_attn_bench.records import FAILED, OUT_OF_MEMORY, SKIPPED, Record
from dilated_attn_bench.timing import Timing, time_calls

FWD_BWD_FLOPS_FACTOR = 3.5


@dataclass(frozen=True)
class Settings:
    """How each row is measured."""

    device: torch.device
    warmup: int
    repeats: int
    # Seconds of timed calls a phase aims for; fewer repeats are timed past it (see ``time_calls``).
    budget_s: float
    backward: bool
    # Quadratic baselines are skipped past this length: at 1M tokens one dense call takes tens of seconds.
    dense_max_seq: int
    # A first call slower than this is the only sample (``time_calls``); ``None`` always warms up.
    once_past_s: float | None = None


def describe_failure(exc: BaseException, caught: Sequence[warnings.WarningMessage] = ()) -> str:
    """``out of memory`` or ``<ExceptionType>: <first line>``, with the warnings that explain it.

    PyTorch's "No available kernel" says why only in the warnings it emits just before, so those
    are kept.
    """
    text = str(exc).strip()
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text:
        return OUT_OF_MEMORY
    first = text.splitlines()[0] if text else ""
    reasons = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))[:3]
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if reasons:
        detail += " (" + "; ".join(reasons) + ")"
    return detail[:300]


@dataclass
class _Phase:
    timing: Timing | None = None
    memory: PeakMemory | None = None
    error: str | None = None


def _measure_phase(fn: Callable[[], Any], settings: Settings, world: World) -> _Phase:
    # The exception is turned into text here so that its traceback, and the tensors its frames
    # hold, are gone before the next row allocates.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with peak_memory(settings.device) as memory:
                timing = time_calls(
                    fn,
                    settings.device,
                    warmup=settings.warmup,
                    repeats=settings.repeats,
                    budget_s=settings.budget_s,
                    once_past_s=settings.once_past_s,
                    agree=lambda seconds: slowest(seconds, world),
                )
            return _Phase(timing, memory)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the row's status
            return _Phase(error=describe_failure(exc, caught))


def blank_record(impl: Implementation, workload: Workload, device: torch.device, world: World) -> Record:
    return Record(
        implementation=impl.name,
        kind=impl.kind,
        preset=workload.preset,
        batch=workload.batch,
        seq_len=workload.seq_len,
        heads=workload.heads,
        head_dim=workload.head_dim,
        dtype=dtype_name(workload.dtype),
        mode=workload.mode,
        causal=workload.causal,
        segment_lengths=list(workload.segment_lengths),
        dilation_rates=list(workload.dilation_rates),
        device=str(device),
        world_size=world.size if impl.distributed else 1,
    )


def _skip_reason(impl: Implementation, workload: Workload, settings: Settings, world: World) -> str | None:
    if impl.quadratic and workload.seq_len > settings.dense_max_seq:
        return f"dense attention at n={workload.seq_len:,} is past --dense-max-seq={settings.dense_max_seq:,}"
    return impl.skip_reason(workload, settings.device, world)


def _inputs_fit(workload: Workload, settings: Settings, shards: int) -> str | None:
    """A note when q, k, v and the output gradient alone exceed the device, so nothing is attempted.

    On a CPU an allocation that large may succeed lazily and then swap for minutes instead of failing.
    """
    itemsize = torch.empty((), dtype=workload.dtype).element_size()
    needed = 4 * workload.tokens * workload.heads * workload.head_dim * itemsize // shards
    capacity = device_capacity_bytes(settings.device)
    if needed <= capacity:
        return None
    gib = 1024 * MB
    return f"inputs alone need {needed / gib:,.1f} GiB; {settings.device} has {capacity / gib:,.1f} GiB"


# Record fields of each phase, in the order of the values ``_fill_phase`` computes.
_PHASE_FIELDS = {
    "forward": (
        "time_ms",
        "time_p10_ms",
        "time_p90_ms",
        "repeats",
        "memory_mb",
        "reserved_mb",
        "throughput_tok_s",
        "tflops",
    ),
    "forward+backward": (
        "fwd_bwd_ms",
        "fwd_bwd_p10_ms",
        "fwd_bwd_p90_ms",
        "fwd_bwd_repeats",
        "fwd_bwd_memory_mb",
        "fwd_bwd_reserved_mb",
        "fwd_bwd_throughput_tok_s",
        "fwd_bwd_tflops",
    ),
}


def _fill_phase(record: Record, name: str, phase: _Phase, flops: float, tokens: int) -> None:
    assert phase.timing is not None and phase.memory is not None
    timing, memory = phase.timing, phase.memory
    seconds = timing.median_ms * 1e-3
    values = (
        timing.median_ms,
        timing.p10_ms,
        timing.p90_ms,
        timing.repeats,
        memory.allocated_mb,
        memory.reserved_mb,
        tokens / seconds,
        flops / seconds / 1e12,
    )
    for field, value in zip(_PHASE_FIELDS[name], values, strict=True):
        setattr(record, field, value)
    if timing.first_call:
        record.notes.append(f"{name} timed by its first call alone (it includes any warm-up cost)")


def measure(impl: Implementation, workload: Workload, settings: Settings, world: World) -> Record:
    """One row: forward, then forward+backward, then the correctness check; never raises."""
    device = settings.device
    record = blank_record(impl, workload, device, world)
    skip = _skip_reason(impl, workload, settings, world)
    if skip is not None:
        record.status = SKIPPED + skip
        return record
    record.flops = impl.flops(workload)

    too_big = _inputs_fit(workload, settings, record.world_size)
    if too_big is not None:
        record.status = FAILED + OUT_OF_MEMORY
        record.notes.append(too_big)
    else:
        _time_phases(impl, workload, settings, world, record, record.flops)
        release(device)

    if impl.kind == KIND_DILATED:
        _check_accuracy(impl, workload, settings, world, record)
        release(device)
    return record


def _time_phases(
    impl: Implementation, workload: Workload, settings: Settings, world: World, record: Record, flops: float
) -> None:
    try:
        prepared = impl.prepare(workload, settings.device, world)
    except Exception as exc:  # noqa: BLE001
        record.status = FAILED + describe_failure(exc)
        record.notes.append("failed while allocating inputs")
        return
    # Only a distributed backend's ranks call collectives, so only they agree on call counts.
    peers = world if impl.distributed else World()
    forward = _measure_phase(prepared.forward, settings, peers)
    if forward.error is not None:
        record.status = FAILED + forward.error
        record.notes.append("failed in the forward")
        return
    _fill_phase(record, "forward", forward, flops, prepared.tokens)

    if not settings.backward:
        return
    no_backward = impl.no_backward_reason(settings.device)
    if no_backward is not None:
        record.notes.append(f"forward+backward not timed: {no_backward}")
        return
    both = _measure_phase(prepared.forward_backward, settings, peers)
    if both.error is not None:
        record.status = FAILED + both.error
        record.notes.append("failed in the forward+backward; the forward columns are valid")
        return
    _fill_phase(record, "forward+backward", both, FWD_BWD_FLOPS_FACTOR * flops, prepared.tokens)


def _check_accuracy(
    impl: Implementation, workload: Workload, settings: Settings, world: World, record: Record
) -> None:
    backward = settings.backward and impl.no_backward_reason(settings.device) is None
    try:
        accuracy = measure_accuracy(impl, workload, settings.device, world, backward=backward)
    except Exception as exc:  # noqa: BLE001
        why = describe_failure(exc)
        if record.ok:
            record.status = FAILED + why
        record.notes.append(f"correctness check failed: {why}")
        return
    record.rel_error = accuracy.forward
    record.grad_rel_error = accuracy.gradients
    record.error_seq_len = accuracy.seq_len
    wrong = accuracy.violation(workload.dtype)
    if wrong is None:
        return
    if record.ok:
        record.status = FAILED + f"wrong result ({wrong} at n={accuracy.seq_len})"
    else:
        record.notes.append(f"also wrong: {wrong} at n={accuracy.seq_len}")


def attach_ratios(records: Sequence[Record]) -> None:
    """Per-device TFLOP/s over the segment ceiling's, for the same workload and phase."""
    ceilings = {r.workload_key(): r for r in records if r.implementation == CEILING and r.ok}
    for record in records:
        ceiling = ceilings.get(record.workload_key())
        if ceiling is None:
            continue
        if record.tflops is not None and ceiling.tflops:
            record.ceiling_ratio = record.tflops / record.world_size / ceiling.tflops
        if record.fwd_bwd_tflops is not None and ceiling.fwd_bwd_tflops:
            record.fwd_bwd_ceiling_ratio = record.fwd_bwd_tflops / record.world_size / ceiling.fwd_bwd_tflops


def run(
    implementations: Sequence[Implementation],
    workloads: Sequence[Workload],
    settings: Settings,
    world: World,
    *,
    progress: bool = True,
    on_record: Callable[[Record], None] | None = None,
) -> list[Record]:
    """Measure each implementation on every workload, in the order given; ``on_record`` sees each row.

    All ranks run the same rows in the same order.
    """
    rows = [(w, impl) for impl in implementations for w in workloads]
    records = []
    bar = tqdm(rows, unit="row", disable=None if (progress and world.is_main) else True, dynamic_ncols=True)
    for workload, impl in bar:
        bar.set_description(f"{impl.name} | {workload.preset} n={workload.seq_len:,}")
        barrier(world)
        record = measure(impl, workload, settings, world)
        records.append(record)
        if on_record is not None:
            on_record(record)
    bar.close()
    attach_ratios(records)
    return records
