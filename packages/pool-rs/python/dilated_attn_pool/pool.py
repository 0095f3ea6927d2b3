"""``RustBufferPool``: the core ``LedgerPool`` over the Rust ledger."""

from __future__ import annotations

from dilated_attn.pool import DEFAULT_EVENT_CAPACITY, LedgerPool, check_budget

from dilated_attn_pool._pool_rs import CacheLedger, Ledger


class RustBufferPool(LedgerPool):
    """A ``BufferPool`` whose bookkeeping runs in Rust; the torch storages stay in Python.

    ``budget_bytes`` bounds the free bytes the pool keeps (``None``: unbounded); semantics in
    ``dilated_attn.pool``. ``cache_ledger`` is the Rust keyed LRU that ``dilated_attn.cache`` uses
    while this is the default pool.
    """

    cache_ledger = CacheLedger

    def __init__(self, budget_bytes: int | None = None) -> None:
        super().__init__(Ledger(check_budget(budget_bytes), DEFAULT_EVENT_CAPACITY))
