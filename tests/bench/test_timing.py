"""How many calls a phase times, and the statistics it reports."""

from __future__ import annotations

import time

import pytest
import torch
from dilated_attn_bench.timing import summarize, time_calls

CPU = torch.device("cpu")


class Sleeper:
    """A callable whose n-th call sleeps ``costs[n]`` seconds (the last cost repeats)."""

    def __init__(self, *costs: float) -> None:
        self.costs = costs
        self.calls = 0

    def __call__(self) -> None:
        time.sleep(self.costs[min(self.calls, len(self.costs) - 1)])
        self.calls += 1


def test_summary_statistics():
    timing = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (timing.median_ms, timing.repeats) == (3.0, 5)
    assert timing.p10_ms == pytest.approx(1.4) and timing.p90_ms == pytest.approx(4.6)
    one = summarize([7.0])
    assert one.median_ms == one.p10_ms == one.p90_ms == 7.0


def test_cheap_calls_are_timed_repeats_times_after_warmup():
    fn = Sleeper(0.0)
    timing = time_calls(fn, CPU, warmup=3, repeats=7, budget_s=10.0)
    assert timing.repeats == 7 and fn.calls == 3 + 7 and not timing.first_call


def test_expensive_calls_shrink_to_the_budget_but_never_below_three():
    fn = Sleeper(0.04)
    timing = time_calls(fn, CPU, warmup=5, repeats=50, budget_s=0.1)
    # The second call (the first may compile) showed that 50 calls would overrun the budget: the
    # warm-up stops there, and 0.1 s holds only 2 calls, fewer than the 3 a median needs.
    assert timing.repeats == 3 and fn.calls == 2 + 3
    assert 35 <= timing.median_ms < 300
    fn = Sleeper(0.01)
    assert 3 < time_calls(fn, CPU, warmup=5, repeats=50, budget_s=0.1).repeats < 50


def test_a_call_past_ten_budgets_is_timed_once_after_warmup():
    fn = Sleeper(0.03)
    timing = time_calls(fn, CPU, warmup=2, repeats=5, budget_s=0.002)
    assert timing.repeats == 1 and fn.calls == 2 + 1 and not timing.first_call


def test_slow_first_call_is_the_only_sample_when_asked():
    fn = Sleeper(0.05, 0.0)
    timing = time_calls(fn, CPU, warmup=3, repeats=5, budget_s=1.0, once_past_s=0.01)
    assert timing.first_call and timing.repeats == 1 and fn.calls == 1 and timing.median_ms >= 50


def test_the_agreed_cost_decides_the_count():
    """A distributed phase follows the slowest rank's cost, so every rank times as many calls."""
    fn = Sleeper(0.0)
    timing = time_calls(fn, CPU, warmup=2, repeats=20, budget_s=1.0, agree=lambda s: max(s, 0.25))
    assert timing.repeats == 4 and fn.calls == 2 + 4


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="warmup=0"):
        time_calls(Sleeper(0.0), CPU, warmup=0, repeats=1, budget_s=1.0)
