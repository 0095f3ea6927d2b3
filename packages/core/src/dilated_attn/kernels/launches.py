"""The sequence of kernel launches for one pattern set: one launch per pattern, merged in place.

Each launch writes the rows its heads select and merges them into what earlier launches wrote
(read-merge-write), so launches run one after another on the stream and never race on a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dilated_attn.cache import metadata_cache
from dilated_attn.pattern import DilationPattern, PatternJob, jobs_for


@dataclass(frozen=True)
class Launch:
    """One pattern on a contiguous range of query heads.

    ``segment``: effective segment length ``W = min(w, n)``; ``dilation``: ``r``; heads
    ``head0 .. head0 + num_heads - 1`` (offset ``j % r``); ``accumulate``: merge into rows written by
    an earlier launch (False for the first launch touching these heads); ``kv_accumulate``: the same
    for the K/V heads they read (dK, dV), which differs from ``accumulate`` only when a group of query
    heads sharing a K/V head spans two launches (grouped-query attention in ``head_groups`` mode).
    """

    segment: int
    dilation: int
    head0: int
    num_heads: int
    accumulate: bool
    kv_accumulate: bool

    def num_segments(self, n: int) -> int:
        return -(-n // self.segment)

    def max_rows(self) -> int:
        """Most dilated rows any head reads from one segment: ``ceil(W / r)``."""
        return -(-self.segment // self.dilation)


@dataclass(frozen=True)
class LaunchPlan:
    """Launches in order, and whether the outputs must start zeroed (``-inf`` LSE).

    Outputs need no initialisation when the first launch on every head has ``r == 1``: it writes every
    row of those heads before anything reads them. ``kv_needs_init``: the same for dK, dV (per K/V head).
    """

    launches: tuple[Launch, ...]
    needs_init: bool
    kv_needs_init: bool


def plan_launches(
    n: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str,
    num_kv_heads: int | None = None,
) -> LaunchPlan:
    """Launches for ``(b, n, num_heads, d)`` queries and ``(b, n, num_kv_heads, d)`` keys and values
    (default ``num_heads``); patterns with ``r == 1`` go first."""
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    key = (n, num_heads, tuple(segment_lengths), tuple(dilation_rates), mode, kv_heads)
    return _LAUNCH_PLANS.get_or_build(
        key, lambda: _plan(*key), nbytes=lambda plan: 128 * (1 + len(plan.launches))
    )


_LAUNCH_PLANS = metadata_cache("core.launch_plans")


def _plan(
    n: int,
    num_heads: int,
    segment_lengths: tuple[int, ...],
    dilation_rates: tuple[int, ...],
    mode: str,
    num_kv_heads: int,
) -> LaunchPlan:
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    jobs = jobs_for(DilationPattern.trusted(segment_lengths, dilation_rates), n, num_heads, mode)
    return plan_jobs(jobs, group=num_heads // num_kv_heads)


def plan_jobs(jobs: Sequence[PatternJob], *, group: int = 1) -> LaunchPlan:
    """Launches for ``jobs`` (each a contiguous head range) whose query heads share K/V heads in
    groups of ``group``; patterns with ``r == 1`` go first.

    ``needs_init`` here says nothing about heads no job covers: a caller running a subset of the
    heads must start those zeroed itself.
    """
    # The LSE merge is commutative; starting each head with an r == 1 pattern lets its first launch
    # overwrite uninitialised memory instead of merging into a zeroed buffer.
    jobs = sorted(jobs, key=lambda job: job.dilation != 1)
    launches = []
    touched: set[int] = set()
    kv_touched: set[int] = set()
    needs_init = kv_needs_init = False
    for job in jobs:
        head0 = job.heads[0]
        if job.heads != tuple(range(head0, head0 + len(job.heads))):
            raise ValueError(f"heads={job.heads} of a pattern must be a contiguous range of head indices")
        fresh = touched.isdisjoint(job.heads)
        if not fresh and not touched.issuperset(job.heads):
            raise ValueError(
                f"heads={job.heads} must all be new or all be merged into; got a partial overlap"
            )
        if fresh and job.dilation != 1:
            needs_init = True
        touched.update(job.heads)
        # A K/V head is written by its first launch and merged into by later ones. When a launch
        # reaches both fresh and written K/V heads it merges into all of them, from zeros.
        kv_heads = {j // group for j in job.heads}
        kv_fresh = kv_touched.isdisjoint(kv_heads)
        if (kv_fresh and job.dilation != 1) or not (kv_fresh or kv_touched.issuperset(kv_heads)):
            kv_needs_init = True
        kv_touched.update(kv_heads)
        launches.append(
            Launch(
                job.segment,
                job.dilation,
                head0,
                len(job.heads),
                accumulate=not fresh,
                kv_accumulate=not kv_fresh,
            )
        )
    return LaunchPlan(tuple(launches), needs_init, kv_needs_init)
