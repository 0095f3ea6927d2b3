"""One process-wide cache of host-side metadata (plans, jobs, block masks), in named regions.

::

    from dilated_attn.cache import metadata_cache

    plans = metadata_cache("core.gather_plans")
    plan = plans.get_or_build(key, lambda: build_plan(...), nbytes=lambda plan: plan_bytes(plan))

Every region shares one least-recently-used order and one byte budget (``DEFAULT_CACHE_BYTES``,
64 MiB, unless the environment variable ``DILATED_ATTN_CACHE_BYTES`` or ``set_cache_budget``
says otherwise). ``nbytes`` is what an entry counts against the budget: an int, a callable of the
built value, or left out for ``estimate_nbytes``'s estimate. An entry larger than the whole budget
is built and returned but not kept. ``cache_stats()`` (and ``python -m dilated_attn cache``) reports
hits, misses, evictions, oversize entries, entries and bytes per region and in total.

The bookkeeping (ids, sizes, LRU order, budget, which entry to evict) is a cache ledger
(``dilated_attn.pool.cache_ledger``): the Rust one of dilated-attn-pool when the default buffer
pool provides it (``cache_ledger`` on its class), the pure-Python one otherwise. It is chosen at
the first ``get_or_build``.

Thread-safe: one lock guards the bookkeeping; ``build`` runs outside it, so two threads missing one
key may both build it (the first value stored is kept and returned to both). Invisible to
``torch.compile``: while ``torch.compiler.is_compiling()``, ``get_or_build`` just returns
``build()``, with no lock and no bookkeeping to trace.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from dilated_attn.pool.cache_ledger import (
    CACHE_STATS_KEYS,
    CacheLedger,
    PythonCacheLedger,
    check_cache_budget,
)
from dilated_attn.pool.ledger import check_int

T = TypeVar("T")

CACHE_BYTES_ENV = "DILATED_ATTN_CACHE_BYTES"
DEFAULT_CACHE_BYTES = 64 << 20
REGION_STATS_KEYS = ("hits", "misses", "evictions", "oversize", "entries", "bytes")

LedgerFactory = Callable[[int], CacheLedger]
NBytes = int | Callable[[Any], int] | None


def estimate_nbytes(value: object) -> int:
    """A value's size for the budget: tensor storage bytes plus ``sys.getsizeof`` of containers.

    Tuples, lists, sets and dicts are walked (each object once); anything else counts its
    ``sys.getsizeof``. Pass ``nbytes`` to ``get_or_build`` where a value's size is known better.
    """
    seen: set[int] = set()
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            total += sys.getsizeof(item) + item.numel() * item.element_size()
            continue
        total += sys.getsizeof(item)
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (tuple, list, set, frozenset)):
            stack.extend(item)
    return total


def _budget_from_env() -> int:
    raw = os.environ.get(CACHE_BYTES_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_CACHE_BYTES
    try:
        value = int(raw.strip().replace("_", ""))
    except ValueError:
        raise ValueError(
            f"{CACHE_BYTES_ENV}={raw!r} must be a whole number of bytes (e.g. {DEFAULT_CACHE_BYTES})"
        ) from None
    return check_cache_budget(CACHE_BYTES_ENV, value)


def default_ledger_factory() -> LedgerFactory:
    """The cache ledger of the default buffer pool (Rust with dilated-attn-pool), else Python's."""
    from dilated_attn.registry import get_pool

    factory = getattr(get_pool("auto").factory, "cache_ledger", None)
    return factory if callable(factory) else PythonCacheLedger


@dataclass
class _Entry:
    region: CacheRegion
    key: Hashable
    value: Any
    nbytes: int


class CacheRegion:
    """A named part of a ``MetadataCache``: its own keys and stats, the cache's budget and LRU."""

    def __init__(self, cache: MetadataCache, name: str) -> None:
        self._cache = cache
        self._name = name
        self._ids: dict[Hashable, int] = {}
        self._hits = self._misses = self._evictions = self._oversize = 0
        self._bytes = 0

    @property
    def name(self) -> str:
        return self._name

    def get_or_build(self, key: Hashable, build: Callable[[], T], *, nbytes: NBytes = None) -> T:
        """The value cached under ``key``, else ``build()``'s, cached at ``nbytes`` bytes.

        ``nbytes``: an int, a callable of the built value returning an int, or ``None`` for
        ``estimate_nbytes(value)``. While ``torch.compile`` traces, this is just ``build()``.
        """
        if torch.compiler.is_compiling():
            return build()
        return self._cache._get_or_build(self, key, build, nbytes)

    def clear(self) -> None:
        """Forget this region's entries (not counted as evictions); its counters stay."""
        self._cache._clear(self)

    def stats(self) -> dict[str, int]:
        """``REGION_STATS_KEYS``: hits, misses, evictions, oversize (built, not kept), entries, bytes."""
        with self._cache._lock:
            return self._stats()

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"CacheRegion({self._name!r}, entries={len(self._ids)}, bytes={self._bytes})"

    def _stats(self) -> dict[str, int]:
        values = (self._hits, self._misses, self._evictions, self._oversize, len(self._ids), self._bytes)
        return dict(zip(REGION_STATS_KEYS, values))


class MetadataCache:
    """Named regions over one LRU with one byte budget; ``dilated_attn.cache`` holds the process's.

    ``ledger`` makes the bookkeeping ledger from a budget (``None``: ``default_ledger_factory()``
    at the first ``get_or_build``); ``budget_bytes`` ``None`` reads ``DILATED_ATTN_CACHE_BYTES`` at
    the first use of the budget, not here: modules take their regions at import, and a bad value must
    fail the call that uses the cache, with its own message, not the import of a plugin.
    """

    def __init__(self, budget_bytes: int | None = None, *, ledger: LedgerFactory | None = None) -> None:
        self._budget: int | None = (
            None if budget_bytes is None else check_cache_budget("MetadataCache", budget_bytes)
        )
        self._ledger_factory = ledger
        self._ledger: CacheLedger | None = None
        self._lock = threading.Lock()
        self._regions: dict[str, CacheRegion] = {}
        self._entries: dict[int, _Entry] = {}
        self._next_id = 0

    def region(self, name: str) -> CacheRegion:
        """The region called ``name`` (made on first use; one object per name)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"metadata_cache: name={name!r} must be a non-empty string")
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                region = self._regions[name] = CacheRegion(self, name)
            return region

    @property
    def budget_bytes(self) -> int:
        return self._resolved_budget()

    def _resolved_budget(self) -> int:
        budget = self._budget
        if budget is None:
            budget = _budget_from_env()
            with self._lock:
                if self._budget is None:
                    self._budget = budget
                budget = self._budget
        return budget

    def set_budget(self, nbytes: int) -> None:
        """A new byte budget; least recently used entries are evicted at once to fit it."""
        budget = check_cache_budget("set_cache_budget", nbytes)
        with self._lock:
            if self._ledger is None:
                self._budget = budget  # so that a bad environment value is never read
        ledger = self._ready_ledger()
        with self._lock:
            self._budget = budget
            dropped = self._evicted(ledger.set_budget(budget))
        del dropped

    def clear(self) -> None:
        """Forget every entry of every region; counters stay."""
        for region in list(self._regions.values()):
            self._clear(region)

    def stats(self) -> dict[str, Any]:
        """``{"budget_bytes", "ledger", "total": {...}, "regions": {name: {...}}}``.

        ``total`` sums the regions' ``REGION_STATS_KEYS`` and adds the ledger's ``peak_bytes``;
        ``ledger`` names the bookkeeping (``"rust"`` or ``"python"``).
        """
        ledger = self._ready_ledger()
        with self._lock:
            regions = {name: region._stats() for name, region in sorted(self._regions.items())}
            ledger_stats = dict(zip(CACHE_STATS_KEYS, ledger.stats()))
        total = {key: sum(r[key] for r in regions.values()) for key in REGION_STATS_KEYS}
        total["peak_bytes"] = ledger_stats["peak_bytes"]
        return {
            "budget_bytes": self._resolved_budget(),
            "ledger": _ledger_name(ledger),
            "total": total,
            "regions": regions,
        }

    def _ready_ledger(self) -> CacheLedger:
        # Resolved outside the lock: the default asks the plugin registry, which may load plugins.
        ledger = self._ledger
        if ledger is not None:
            return ledger
        budget = self._resolved_budget()
        factory = self._ledger_factory or default_ledger_factory()
        with self._lock:
            if self._ledger is None:
                self._ledger = factory(budget)
            return self._ledger

    def _get_or_build(self, region: CacheRegion, key: Hashable, build: Callable[[], T], nbytes: NBytes) -> T:
        try:
            hash(key)
        except TypeError:
            raise TypeError(
                f"get_or_build: key={key!r} must be hashable (got {type(key).__name__})"
            ) from None
        ledger = self._ready_ledger()
        with self._lock:
            entry_id = region._ids.get(key)
            if entry_id is not None:
                ledger.touch(entry_id)
                region._hits += 1
                return self._entries[entry_id].value  # type: ignore[no-any-return]
        value = build()
        size = _size_of(value, nbytes)
        with self._lock:
            region._misses += 1
            entry_id = region._ids.get(key)
            if entry_id is not None:
                # Another thread built this key meanwhile: keep the stored value, so that every
                # caller gets the same object.
                ledger.touch(entry_id)
                return self._entries[entry_id].value  # type: ignore[no-any-return]
            entry_id = self._next_id
            self._next_id += 1
            evicted = ledger.insert(entry_id, size)
            if evicted == [entry_id]:
                region._oversize += 1
                return value
            region._ids[key] = entry_id
            region._bytes += size
            self._entries[entry_id] = _Entry(region, key, value, size)
            dropped = self._evicted(evicted)
        # Evicted values are let go here, after the lock: dropping one may run finalizers.
        del dropped
        return value

    def _evicted(self, evicted: list[int]) -> list[Any]:
        dropped = []
        for entry_id in evicted:
            entry = self._entries.pop(entry_id)
            owner = entry.region
            del owner._ids[entry.key]
            owner._bytes -= entry.nbytes
            owner._evictions += 1
            dropped.append(entry.value)
        return dropped

    def _clear(self, region: CacheRegion) -> None:
        ledger = self._ledger
        with self._lock:
            dropped = []
            for entry_id in region._ids.values():
                if ledger is not None:
                    ledger.remove(entry_id)
                dropped.append(self._entries.pop(entry_id).value)
            region._ids.clear()
            region._bytes = 0
        del dropped


def _size_of(value: object, nbytes: NBytes) -> int:
    if nbytes is None:
        return estimate_nbytes(value)
    size = nbytes(value) if callable(nbytes) else nbytes
    return check_int("get_or_build", "nbytes", size)


def _ledger_name(ledger: object) -> str:
    if isinstance(ledger, PythonCacheLedger):
        return "python"
    module = type(ledger).__module__
    return "rust" if module.startswith("dilated_attn_pool") else f"{module}.{type(ledger).__qualname__}"


_cache: MetadataCache | None = None
_cache_lock = threading.Lock()


def _process_cache() -> MetadataCache:
    global _cache
    if _cache is None:
        with _cache_lock:
            if _cache is None:
                _cache = MetadataCache()
    return _cache


def metadata_cache(name: str) -> CacheRegion:
    """The region ``name`` of the process-wide cache (e.g. ``"core.gather_plans"``)."""
    return _process_cache().region(name)


def cache_stats() -> dict[str, Any]:
    """The process-wide cache's stats: budget, ledger, totals and per-region counters."""
    return _process_cache().stats()


def set_cache_budget(nbytes: int) -> None:
    """Set the process-wide cache's byte budget (evicting at once to fit); ``0`` keeps nothing."""
    _process_cache().set_budget(nbytes)


def clear_cache() -> None:
    """Forget every entry of the process-wide cache (counters stay)."""
    _process_cache().clear()


__all__ = [
    "CACHE_BYTES_ENV",
    "DEFAULT_CACHE_BYTES",
    "REGION_STATS_KEYS",
    "CacheRegion",
    "MetadataCache",
    "cache_stats",
    "clear_cache",
    "default_ledger_factory",
    "estimate_nbytes",
    "metadata_cache",
    "set_cache_budget",
]
