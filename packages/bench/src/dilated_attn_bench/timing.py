"""The one timer of every benchmark: CUDA events on a GPU, ``perf_counter`` on a CPU.

``time_calls`` times a callable on its device (warm-up, then a median over timed calls);
``interleaved`` and ``mean_ns`` time host-side microbenchmarks (a pool's acquire/release pair) in
rounds whose order rotates, so that drift of a shared machine hits every contender alike.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over ``repeats`` timed calls (after the warm-up).

    The unit is whatever the samples are in for ``interleaved`` (nanoseconds per pair there).
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    # The single sample is the first call itself (see ``time_calls``'s ``once_past_s``).
    first_call: bool = False
    min_ms: float | None = None
    # The first (untimed) call, compilation and autotuning included.
    first_ms: float | None = None


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile; exact for one value, unlike ``statistics.quantiles``."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> Timing:
    values = sorted(samples_ms)
    return Timing(
        statistics.median(values),
        _quantile(values, 0.1),
        _quantile(values, 0.9),
        len(values),
        min_ms=values[0],
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call of ``fn``, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _check_counts(warmup: int, repeats: int, budget_s: float | None) -> None:
    if warmup < 1 or repeats < 1:
        raise ValueError(f"warmup={warmup} and repeats={repeats} must both be >= 1")
    if budget_s is not None and not (math.isfinite(budget_s) and budget_s >= 0):
        raise ValueError(f"budget_s={budget_s} must be a finite number of seconds >= 0, or None")


def time_calls(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    budget_s: float | None,
    once_past_s: float | None = None,
    agree: Callable[[float], float] | None = None,
) -> Timing:
    """Time ``fn()``: the median and p10/p90 of up to ``repeats`` calls after ``warmup`` untimed ones.

    The first warm-up call carries compilation and autotuning (``Timing.first_ms``); the last one's
    cost sets how many calls are timed: when ``repeats`` calls would take longer than ``budget_s``,
    fewer are (at least 3, or 1 when a call alone takes 10 x the budget), so that quadratic baselines
    at long lengths stay affordable, and the warm-up stops early for the same reason. With
    ``budget_s=None`` exactly ``warmup`` and ``repeats`` calls are made. ``Timing.repeats`` says how
    many were timed. Each GPU call is timed by its own pair of CUDA events, synchronised once at
    the end.

    With ``once_past_s`` set, a first call slower than that is the only sample (``first_call=True``):
    for eager CPU code, whose warm-up is negligible beside a call of many seconds.

    ``agree`` maps this process's cost of a call to the one all processes decide on (the slowest
    rank's): a distributed ``fn`` must be called the same number of times on every rank.
    """
    _check_counts(warmup, repeats, budget_s)
    agree = agree or (lambda seconds: seconds)
    first_ms = wall_ms(fn, device)
    first_s = agree(first_ms * 1e-3)
    if once_past_s is not None and first_s > once_past_s:
        return Timing(first_ms, first_ms, first_ms, 1, first_call=True, min_ms=first_ms, first_ms=first_ms)
    if budget_s is None:
        for _ in range(warmup - 1):
            fn()
        count = repeats
    else:
        cost_s = first_s
        for _ in range(warmup - 1):
            cost_s = agree(wall_ms(fn, device) * 1e-3)
            if cost_s * repeats > budget_s:
                break
        floor = 1 if cost_s > 10 * budget_s else 3
        count = min(repeats, max(floor, int(budget_s / max(cost_s, 1e-9))))

    if device.type != "cuda":
        samples = [wall_ms(fn, device) for _ in range(count)]
    else:
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)
        ]
        _sync(device)
        for start, end in events:
            start.record()
            fn()
            end.record()
        _sync(device)
        samples = [start.elapsed_time(end) for start, end in events]
    timing = summarize(samples)
    return Timing(
        timing.median_ms, timing.p10_ms, timing.p90_ms, timing.repeats, False, timing.min_ms, first_ms
    )


def mean_ns(fn: Callable[[], Any], calls: int) -> float:
    """Mean nanoseconds of ``calls`` back-to-back calls of ``fn`` on the host clock (no device sync)."""
    start = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - start) / calls


def interleaved(blocks: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, Timing]:
    """Each block's samples over ``rounds`` rounds, the blocks' order rotating every round.

    A block returns its own sample (e.g. ``mean_ns`` of a loop); each is called once untimed first
    to warm caches and allocators.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    names = list(blocks)
    for name in names:
        blocks[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(blocks[name]())
    return {name: summarize(values) for name, values in samples.items()}
