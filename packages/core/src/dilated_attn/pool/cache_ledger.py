"""The metadata cache's bookkeeping: entry ids, their sizes, one exact LRU and a byte budget.

``dilated_attn.cache`` keeps the cached values; a *cache ledger* only decides which ids to evict.
``PythonCacheLedger`` here and ``dilated_attn_pool._pool_rs.CacheLedger`` (Rust) implement the same
semantics, decision for decision:

- ``insert(entry_id, nbytes)`` adds the entry as the most recently used one, then evicts least
  recently used entries until the bytes held fit ``budget_bytes``; returns the evicted ids. An entry
  larger than the whole budget is not kept: the result is ``[entry_id]``, ``oversize`` counts it and
  nothing else changes. Inserting an id already held raises ``ValueError``.
- ``touch(entry_id)`` makes the entry the most recently used (counted in ``hits``).
- ``remove(entry_id)`` forgets the entry (not an eviction) and returns its size.
- ``set_budget(budget_bytes)`` evicts least recently used entries until the bytes held fit it.
- ``stats()`` returns the values of ``CACHE_STATS_KEYS``; ``order()`` the held ids, LRU first.

Every integer argument is checked as ``dilated_attn.pool.ledger.check_int`` says; a budget must
be below ``MAX_CACHE_BUDGET_BYTES`` (2**62), so the bytes held always fit 64 bits. A refused call
changes nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from dilated_attn.pool.ledger import MAX_REQUEST_BYTES, check_int

CACHE_STATS_KEYS = (
    "budget_bytes",
    "entries",
    "bytes",
    "peak_bytes",
    "hits",
    "inserts",
    "oversize",
    "evictions",
)
MAX_CACHE_BUDGET_BYTES = MAX_REQUEST_BYTES


class CacheLedger(Protocol):
    """A keyed LRU of sizes under a byte budget, thread-safe; semantics in this module's docstring."""

    def insert(self, entry_id: int, nbytes: int) -> list[int]: ...

    def touch(self, entry_id: int) -> None: ...

    def remove(self, entry_id: int) -> int: ...

    def set_budget(self, budget_bytes: int) -> list[int]: ...

    def stats(self) -> Sequence[int]: ...

    def order(self) -> list[int]: ...


def check_cache_budget(op: str, budget_bytes: object) -> int:
    """``budget_bytes`` as a cache ledger takes it: an int in ``[0, 2**62)``."""
    budget = check_int(op, "budget_bytes", budget_bytes)
    if budget >= MAX_CACHE_BUDGET_BYTES:
        raise ValueError(f"{op}: budget_bytes={budget} must be < 2**62")
    return budget


def _unknown(op: str, entry_id: int) -> ValueError:
    return ValueError(f"{op}: entry {entry_id} is not held (it was evicted, removed or never inserted)")


class PythonCacheLedger:
    """The cache ledger in pure Python (``CacheLedger``), used when dilated-attn-pool is absent."""

    def __init__(self, budget_bytes: int) -> None:
        self._budget = check_cache_budget("CacheLedger", budget_bytes)
        self._lock = threading.Lock()
        # id -> nbytes, least recently used first.
        self._lru: OrderedDict[int, int] = OrderedDict()
        self._bytes = self._peak = 0
        self._hits = self._inserts = self._oversize = self._evictions = 0

    def insert(self, entry_id: int, nbytes: int) -> list[int]:
        entry_id = check_int("insert", "entry_id", entry_id)
        nbytes = check_int("insert", "nbytes", nbytes)
        with self._lock:
            if entry_id in self._lru:
                raise ValueError(f"insert: entry {entry_id} is already held; insert each id once")
            if nbytes > self._budget:
                self._oversize += 1
                return [entry_id]
            self._lru[entry_id] = nbytes
            self._inserts += 1
            self._bytes += nbytes
            self._peak = max(self._peak, self._bytes)
            return self._evict_to(self._budget)

    def touch(self, entry_id: int) -> None:
        entry_id = check_int("touch", "entry_id", entry_id)
        with self._lock:
            if entry_id not in self._lru:
                raise _unknown("touch", entry_id)
            self._lru.move_to_end(entry_id)
            self._hits += 1

    def remove(self, entry_id: int) -> int:
        entry_id = check_int("remove", "entry_id", entry_id)
        with self._lock:
            nbytes = self._lru.pop(entry_id, None)
            if nbytes is None:
                raise _unknown("remove", entry_id)
            self._bytes -= nbytes
            return nbytes

    def set_budget(self, budget_bytes: int) -> list[int]:
        budget = check_cache_budget("set_budget", budget_bytes)
        with self._lock:
            self._budget = budget
            return self._evict_to(budget)

    def stats(self) -> tuple[int, ...]:
        with self._lock:
            return (
                self._budget,
                len(self._lru),
                self._bytes,
                self._peak,
                self._hits,
                self._inserts,
                self._oversize,
                self._evictions,
            )

    def order(self) -> list[int]:
        with self._lock:
            return list(self._lru)

    def _evict_to(self, limit: int) -> list[int]:
        evicted: list[int] = []
        while self._bytes > limit:
            entry_id, nbytes = self._lru.popitem(last=False)
            self._bytes -= nbytes
            self._evictions += 1
            evicted.append(entry_id)
        return evicted
