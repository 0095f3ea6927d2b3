"""The compiled ledgers of ``dilated_attn_pool`` (private: use ``RustBufferPool``).

Integer arguments are checked at the boundary: a non-int raises ``TypeError``, a negative int
``ValueError``, one wider than 64 bits (32 for device and dtype codes) ``OverflowError``.
"""

from typing import final

__all__ = [
    "__version__",
    "STATS_KEYS",
    "EVENT_KINDS",
    "MIN_BLOCK_BYTES",
    "LARGE_BYTES",
    "ROUNDUP_DIVISIONS",
    "MAX_REQUEST_BYTES",
    "MAX_RESERVED_BYTES",
    "DEFAULT_EVENT_CAPACITY",
    "MAX_EVENT_CAPACITY",
    "REFUSAL_SAMPLES",
    "CACHE_STATS_KEYS",
    "MAX_CACHE_BUDGET_BYTES",
    "CacheLedger",
    "Ledger",
    "round_bytes",
]

__version__: str
STATS_KEYS: list[str]
EVENT_KINDS: list[str]
MIN_BLOCK_BYTES: int
LARGE_BYTES: int
ROUNDUP_DIVISIONS: int
MAX_REQUEST_BYTES: int
MAX_RESERVED_BYTES: int
DEFAULT_EVENT_CAPACITY: int
MAX_EVENT_CAPACITY: int
REFUSAL_SAMPLES: list[tuple[str, str, str]]
CACHE_STATS_KEYS: list[str]
MAX_CACHE_BUDGET_BYTES: int

def round_bytes(nbytes: int) -> int:
    """The bucket size in bytes of a request of ``nbytes`` bytes."""

@final
class Ledger:
    """The thread-safe ledger of one ``RustBufferPool`` (``dilated_attn.pool.PoolLedger``)."""

    def __new__(cls, budget_bytes: int | None = None, event_capacity: int = 1024) -> Ledger: ...
    @property
    def budget_bytes(self) -> int | None: ...
    def acquire(self, device: int, dtype: int, nbytes: int) -> tuple[int, int, int]:
        """``(buffer_id, serial, alloc_bytes)``; ``alloc_bytes`` is 0 on a hit."""
    def abandon(self, buffer_id: int, serial: int) -> None: ...
    def release(self, buffer_id: int, serial: int) -> list[int]:
        """The ids the budget evicted."""
    def pin(self, buffer_id: int, serial: int) -> tuple[int, int, int, int] | None:
        """``None``, or the budget's refusal ``(requested, free, pinned, budget)`` in bytes."""
    def unpin(self, buffer_id: int, serial: int) -> list[int]:
        """The ids the budget evicted."""
    def trim(self, target_bytes: int) -> tuple[int, list[int]]:
        """``(bytes evicted, evicted ids)``."""
    def stats(self) -> list[int]:
        """Values in ``STATS_KEYS`` order."""
    def events(self) -> list[tuple[int, int, int, int]]:
        """``(kind, buffer_id, rounded_bytes, requested_bytes)`` of the last events, oldest first."""
    def time_pairs(self, device: int, dtype: int, nbytes: int, iterations: int) -> int:
        """Nanoseconds for ``iterations`` acquire+release pairs run inside Rust."""

@final
class CacheLedger:
    """The keyed LRU behind ``dilated_attn.cache`` (``dilated_attn.pool.cache_ledger.CacheLedger``)."""

    def __new__(cls, budget_bytes: int) -> CacheLedger: ...
    def insert(self, entry_id: int, nbytes: int) -> list[int]:
        """The evicted ids; ``[entry_id]`` alone when the entry is larger than the budget."""
    def touch(self, entry_id: int) -> None: ...
    def remove(self, entry_id: int) -> int:
        """The removed entry's size."""
    def set_budget(self, budget_bytes: int) -> list[int]:
        """The evicted ids."""
    def stats(self) -> list[int]:
        """Values in ``CACHE_STATS_KEYS`` order."""
    def order(self) -> list[int]:
        """Held ids, least recently used first."""
