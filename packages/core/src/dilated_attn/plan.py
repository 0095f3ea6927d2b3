"""Index plans: which rows each head reads for one pattern, built once per shape and cached.

For a pattern with effective segment length ``W`` and dilation ``r``, head ``j`` reads, in each
segment, the rows at offsets ``o + r*t`` (``o = j % r``). Segments of one length share the same
offsets, so a plan stores them relative to the segment start, as flat indices into a segment viewed
as ``(W * h)`` rows of ``d``: ``(o + r*t) * h + j``. Gathering a whole class of segments is then one
indexing op on a ``(b, S, W*h, d)`` view, and writing back is the same op on the output.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from dilated_attn.pattern import PatternJob


@dataclass(frozen=True)
class Group:
    """Heads that read the same number of rows ``m`` from every segment of one length ``L``.

    ``start``: first row of the first segment; ``count``: number of segments (each ``L`` rows, placed
    back to back); ``flat``: ``(H', m)`` flat indices into a segment viewed as ``(L*h, ...)``;
    ``rows``: ``(H', m)`` row offsets within the segment (for per-row masks).
    """

    start: int
    count: int
    length: int
    heads: tuple[int, ...]
    rows_per_segment: int
    flat: torch.Tensor
    rows: torch.Tensor


def _segment_classes(n: int, W: int) -> list[tuple[int, int, int]]:
    """(start, count, length) for the full segments and the shorter last one."""
    full = n // W
    classes = []
    if full:
        classes.append((0, full, W))
    if n - full * W:
        classes.append((full * W, 1, n - full * W))
    return classes


def _build(job: PatternJob, n: int, num_heads: int, device: torch.device) -> tuple[Group, ...]:
    groups: list[Group] = []
    r = job.dilation
    for start, count, length in _segment_classes(n, job.segment):
        by_m: dict[int, list[int]] = {}
        for j in job.heads:
            m = len(range(j % r, length, r))
            if m:
                by_m.setdefault(m, []).append(j)
        for m, heads in sorted(by_m.items()):
            offsets = torch.tensor([j % r for j in heads], dtype=torch.int64)
            rows = offsets[:, None] + r * torch.arange(m, dtype=torch.int64)[None, :]
            flat = rows * num_heads + torch.tensor(heads, dtype=torch.int64)[:, None]
            groups.append(Group(start, count, length, tuple(heads), m, flat.to(device), rows.to(device)))
    return tuple(groups)


_CACHE_SIZE = 128
_cache: OrderedDict[tuple[object, ...], tuple[Group, ...]] = OrderedDict()
_cache_lock = threading.Lock()


def groups_for(job: PatternJob, n: int, num_heads: int, device: torch.device) -> tuple[Group, ...]:
    """The cached gather plan of ``job`` for sequence length ``n`` and ``num_heads`` heads."""
    key = (job, n, num_heads, device)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    built = _build(job, n, num_heads, device)
    with _cache_lock:
        _cache[key] = built
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return built


def plan_cache_info() -> dict[str, int]:
    """Entries held by the plan cache (for tests and diagnostics)."""
    with _cache_lock:
        return {"entries": len(_cache), "capacity": _CACHE_SIZE}


def segment_view(x: torch.Tensor, group: Group) -> torch.Tensor:
    """``x`` ``(b, n, h, *rest)`` (contiguous) seen as ``(b, count, length * h, *rest)`` for ``group``."""
    b, _, h = x.shape[:3]
    rest = x.shape[3:]
    part = x[:, group.start : group.start + group.count * group.length]
    return part.view(b, group.count, group.length * h, *rest)


def gather(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Rows of ``group`` from ``x`` ``(b, n, h, d)``: ``(b * count, H', m, d)``."""
    rows = segment_view(x, group)[:, :, group.flat]
    return rows.reshape(-1, *rows.shape[2:])
