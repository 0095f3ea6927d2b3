"""Wall time of a callable on its device: CUDA events on a GPU, ``perf_counter`` on a CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over ``repeats`` timed calls (after the warm-up)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    # The single sample is the first call itself (see ``time_calls``'s ``once_past_s``).
    first_call: bool = False


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile; exact for one value, unlike ``statistics.quantiles``."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> Timing:
    values = sorted(samples_ms)
    return Timing(statistics.median(values), _quantile(values, 0.1), _quantile(values, 0.9), len(values))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_call_ms(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def time_calls(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    budget_s: float,
    once_past_s: float | None = None,
    agree: Callable[[float], float] | None = None,
) -> Timing:
    """Time ``fn()``: the median and p10/p90 of up to ``repeats`` calls after ``warmup`` untimed ones.

    The first warm-up call carries compilation and autotuning; the last one's cost sets how many
    calls are timed: when ``repeats`` calls would take longer than ``budget_s``, fewer are (at least 3,
    or 1 when a call alone takes 10 x the budget), so that quadratic baselines at long lengths stay
    affordable, and the warm-up stops early for the same reason. ``Timing.repeats`` says how many were
    timed. Each GPU call is timed by its own pair of CUDA events, synchronised once at the end.

    With ``once_past_s`` set, a first call slower than that is the only sample (``first_call=True``):
    for eager CPU code, whose warm-up is negligible beside a call of many seconds.

    ``agree`` maps this process's cost of a call to the one all processes decide on (the slowest
    rank's): a distributed ``fn`` must be called the same number of times on every rank.
    """
    if warmup < 1 or repeats < 1:
        raise ValueError(f"warmup={warmup} and repeats={repeats} must both be >= 1")
    agree = agree or (lambda seconds: seconds)
    first_ms = _one_call_ms(fn, device)
    first_s = agree(first_ms * 1e-3)
    if once_past_s is not None and first_s > once_past_s:
        return Timing(first_ms, first_ms, first_ms, 1, first_call=True)
    cost_s = first_s
    for _ in range(warmup - 1):
        cost_s = agree(_one_call_ms(fn, device) * 1e-3)
        if cost_s * repeats > budget_s:
            break
    floor = 1 if cost_s > 10 * budget_s else 3
    count = min(repeats, max(floor, int(budget_s / max(cost_s, 1e-9))))

    if device.type != "cuda":
        return summarize([_one_call_ms(fn, device) for _ in range(count)])

    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)
    ]
    _sync(device)
    for start, end in events:
        start.record()
        fn()
        end.record()
    _sync(device)
    return summarize([start.elapsed_time(end) for start, end in events])
