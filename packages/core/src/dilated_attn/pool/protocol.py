"""What a buffer pool and its ledger promise: the protocols, the lease, the budget's refusal, events."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from dilated_attn.pool.storage import LedgerPool

DeviceLike = torch.device | str | int


class PoolBudgetError(ValueError):
    """``pin`` refused: the pinned set would no longer fit ``budget_bytes``.

    ``requested_bytes`` is the rounded size of the buffer to pin, ``free_bytes`` and ``pinned_bytes``
    the pool's free and pinned bytes when it refused.
    """

    def __init__(
        self,
        requested_bytes: int,
        free_bytes: int,
        pinned_bytes: int,
        budget_bytes: int,
        buffer_id: int | None = None,
    ) -> None:
        self.requested_bytes = requested_bytes
        self.free_bytes = free_bytes
        self.pinned_bytes = pinned_bytes
        self.budget_bytes = budget_bytes
        self.buffer_id = buffer_id
        which = "a buffer" if buffer_id is None else f"buffer {buffer_id}"
        super().__init__(
            f"pin: pinning {which} of {requested_bytes} bytes would make the pinned set "
            f"{pinned_bytes + requested_bytes} bytes, over budget_bytes={budget_bytes} "
            f"(pinned_bytes={pinned_bytes}, free_bytes={free_bytes}); pinned buffers cannot be "
            "evicted, so the pinned set must fit the budget: unpin first or raise budget_bytes"
        )


class Lease:
    """One holder's use of one pooled buffer: ``tensor`` views it until the lease is released.

    A context manager: leaving the ``with`` block releases the lease unless it was released already.
    """

    __slots__ = ("_pool", "_buffer_id", "_serial", "_nbytes", "_tensor", "_released")

    def __init__(
        self, pool: LedgerPool, buffer_id: int, serial: int, nbytes: int, tensor: torch.Tensor
    ) -> None:
        self._pool = pool
        self._buffer_id = buffer_id
        self._serial = serial
        self._nbytes = nbytes
        self._tensor = tensor
        self._released = False

    @property
    def tensor(self) -> torch.Tensor:
        """The requested ``shape``/``dtype`` view of the buffer (valid until release)."""
        return self._tensor

    @property
    def buffer_id(self) -> int:
        return self._buffer_id

    @property
    def nbytes(self) -> int:
        """Requested bytes: ``tensor.numel() * tensor.element_size()`` (unrounded)."""
        return self._nbytes

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the buffer back to the pool that issued this lease."""
        self._pool.release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._released:
            self._pool.release(self)

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        t = self._tensor
        return (
            f"Lease(buffer_id={self._buffer_id}, shape={tuple(t.shape)}, dtype={t.dtype}, "
            f"device={t.device}, nbytes={self._nbytes}, {state})"
        )


@runtime_checkable
class BufferPool(Protocol):
    """What attention backends ask of a pool; semantics in ``dilated_attn.pool``'s docstring."""

    @property
    def budget_bytes(self) -> int | None: ...

    def acquire(self, shape: Sequence[int], dtype: torch.dtype, device: DeviceLike) -> Lease: ...

    def release(self, lease: Lease) -> None: ...

    def pin(self, lease: Lease) -> None: ...

    def unpin(self, lease: Lease) -> None: ...

    def trim(self, target_bytes: int = 0) -> int: ...

    def stats(self) -> dict[str, int]: ...


class PoolLedger(Protocol):
    """A pool's bookkeeping, integers only; one lock inside, nothing outside it is called under it.

    Devices and dtypes arrive as small int codes chosen by the caller. A grant is
    ``(buffer_id, serial, alloc_bytes)``: ``serial`` names the lease, ``alloc_bytes`` is 0 on a hit
    and the rounded size to allocate on a miss. Lists of ints returned are evicted buffer ids whose
    storages the caller drops. Misuse raises ``ValueError`` with the messages of
    ``dilated_attn.pool.ledger.refusal``; arguments outside their range raise as
    ``dilated_attn.pool.ledger.check_int`` says; a miss that would take ``reserved_bytes`` over
    ``MAX_RESERVED_BYTES`` raises ``MemoryError``. A refused call changes nothing.
    """

    @property
    def budget_bytes(self) -> int | None: ...

    def acquire(self, device: int, dtype: int, nbytes: int) -> tuple[int, int, int]: ...

    def abandon(self, buffer_id: int, serial: int) -> None:
        """Forget a missed buffer whose storage could not be allocated."""

    def release(self, buffer_id: int, serial: int) -> list[int]: ...

    def pin(self, buffer_id: int, serial: int) -> tuple[int, int, int, int] | None:
        """``None``, or the budget's refusal ``(requested, free, pinned, budget)`` bytes."""

    def unpin(self, buffer_id: int, serial: int) -> list[int]: ...

    def trim(self, target_bytes: int) -> tuple[int, list[int]]: ...

    def stats(self) -> Sequence[int]:
        """Values in ``STATS_KEYS`` order."""

    def events(self) -> list[tuple[int, int, int, int]]:
        """The last events, oldest first: ``(kind, buffer_id, rounded_bytes, requested_bytes)``."""


class PoolEvent(NamedTuple):
    """One entry of a pool's event history; ``requested_bytes`` is 0 for pin, unpin and evict."""

    kind: str
    buffer_id: int
    rounded_bytes: int
    requested_bytes: int
