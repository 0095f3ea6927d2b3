"""The compiled ledger of ``dilated_attn_pool`` (private: use ``RustBufferPool``)."""

from typing import final

__all__ = ["__version__", "STATS_KEYS", "MAX_REQUEST_BYTES", "Ledger", "round_bytes"]

__version__: str
STATS_KEYS: list[str]
MAX_REQUEST_BYTES: int

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
