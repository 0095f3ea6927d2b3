"""Storage: ``LedgerPool`` owns the torch storages and the tensor views over any ``PoolLedger``."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch

from dilated_attn.pool.cache_ledger import CacheLedger, PythonCacheLedger
from dilated_attn.pool.ledger import (
    EVENT_KINDS,
    MAX_REQUEST_BYTES,
    STATS_KEYS,
    PythonLedger,
    _index,
    refusal,
)
from dilated_attn.pool.protocol import DeviceLike, Lease, PoolBudgetError, PoolEvent, PoolLedger


def _check_shape(shape: object) -> tuple[int, ...]:
    if _index(shape) is not None:
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape={shape!r} must be a sequence of non-negative ints")
    dims = []
    for i, dim in enumerate(shape):
        value = _index(dim)
        if value is None:
            raise TypeError(f"shape[{i}]={dim!r} must be an int (got {type(dim).__name__})")
        if value < 0:
            raise ValueError(f"shape[{i}]={dim} must be >= 0")
        dims.append(value)
    return tuple(dims)


class _Place(NamedTuple):
    device: torch.device
    device_code: int
    dtype_code: int
    # An empty tensor of this device and dtype: ``new_empty`` is the cheapest way to a tensor
    # object that ``set_`` can then point at a pooled storage.
    proto: torch.Tensor


class _Stored:
    """A pooled storage and a tensor over it in the shape of its latest lease.

    Each lease gets ``view.detach()``: a new tensor object (a third of the cost of building a view
    from scratch) that is a non-differentiable alias, so whatever its holder does to it (in-place
    ops that attach autograd history, ``requires_grad_``, in-place reshapes) never reaches ``view``
    or the next holder.
    """

    __slots__ = ("storage", "dims", "view")

    def __init__(self, storage: torch.UntypedStorage, dims: tuple[int, ...], view: torch.Tensor) -> None:
        self.storage = storage
        self.dims = dims
        self.view = view


def _view(place: _Place, storage: torch.UntypedStorage, dims: tuple[int, ...]) -> torch.Tensor:
    """A contiguous ``dims`` tensor of ``place``'s dtype over the start of ``storage``."""
    # Without a stride, set_ lays the view out contiguously; torch's stubs lack that overload.
    return place.proto.new_empty(0).set_(storage, 0, dims)  # type: ignore[call-overload]


class LedgerPool:
    """A ``BufferPool`` over a ``PoolLedger``: it owns the storages and makes the tensor views.

    ``cache_ledger`` makes the ledger ``dilated_attn.cache`` keeps its books with when this is the
    default pool: the bookkeeping of one package (pure Python here, Rust in dilated-attn-pool).
    """

    cache_ledger: ClassVar[type[CacheLedger]] = PythonCacheLedger

    def __init__(self, ledger: PoolLedger) -> None:
        self._ledger = ledger
        self._storages: dict[int, _Stored] = {}
        self._places: dict[tuple[DeviceLike, torch.dtype], _Place] = {}
        self._device_codes: dict[torch.device, int] = {}
        self._dtype_codes: dict[torch.dtype, int] = {}
        self._places_lock = threading.Lock()

    @property
    def budget_bytes(self) -> int | None:
        return self._ledger.budget_bytes

    def acquire(self, shape: Sequence[int], dtype: torch.dtype, device: DeviceLike) -> Lease:
        """A lease on a buffer holding ``shape`` of ``dtype`` on ``device``; see the module docstring."""
        dims = _check_shape(shape)
        try:
            place = self._places[device, dtype]
        except (KeyError, TypeError):
            place = self._place(device, dtype)
        nbytes = math.prod(dims) * dtype.itemsize
        if nbytes >= MAX_REQUEST_BYTES:
            raise ValueError(
                f"shape={dims} of {dtype} needs {nbytes} bytes; a request must be under 2**62 bytes"
            )
        buffer_id, serial, alloc_bytes = self._ledger.acquire(place.device_code, place.dtype_code, nbytes)
        if alloc_bytes:
            try:
                storage = torch.UntypedStorage(alloc_bytes, device=place.device)
            except BaseException:
                self._ledger.abandon(buffer_id, serial)
                raise
            stored = self._storages[buffer_id] = _Stored(storage, dims, _view(place, storage, dims))
        else:
            # Only this lease's holder touches the entry of a leased buffer: no lock needed.
            stored = self._storages[buffer_id]
            if stored.dims != dims:
                stored.dims, stored.view = dims, _view(place, stored.storage, dims)
        return Lease(self, buffer_id, serial, nbytes, stored.view.detach())

    def release(self, lease: Lease) -> None:
        """Return ``lease``'s buffer to the pool; a second release raises ``ValueError``."""
        self._check_lease(lease, "release")
        if lease._released:
            raise refusal("release", lease._buffer_id, "released")
        evicted = self._ledger.release(lease._buffer_id, lease._serial)
        lease._released = True
        if evicted:
            self._drop(evicted)

    def pin(self, lease: Lease) -> None:
        """Keep ``lease``'s buffer out of reuse and eviction until a matching ``unpin``."""
        self._check_lease(lease, "pin")
        refused = self._ledger.pin(lease._buffer_id, lease._serial)
        if refused is not None:
            raise PoolBudgetError(*refused, buffer_id=lease._buffer_id)

    def unpin(self, lease: Lease) -> None:
        """Undo one ``pin`` of ``lease``'s buffer (the lease may be released already)."""
        self._check_lease(lease, "unpin")
        evicted = self._ledger.unpin(lease._buffer_id, lease._serial)
        if evicted:
            self._drop(evicted)

    def trim(self, target_bytes: int = 0) -> int:
        """Evict least recently used free buffers until ``free_bytes <= target_bytes``; bytes freed."""
        if isinstance(target_bytes, bool) or not isinstance(target_bytes, int):
            raise TypeError(
                f"target_bytes={target_bytes!r} must be an int (got {type(target_bytes).__name__})"
            )
        if target_bytes < 0:
            raise ValueError(f"target_bytes={target_bytes} must be >= 0")
        freed, evicted = self._ledger.trim(min(target_bytes, MAX_REQUEST_BYTES))
        self._drop(evicted)
        return freed

    def stats(self) -> dict[str, int]:
        """Counters and byte totals, keys ``STATS_KEYS`` (meanings in the module docstring)."""
        return dict(zip(STATS_KEYS, self._ledger.stats()))

    def events(self) -> list[PoolEvent]:
        """The most recent bookkeeping events, oldest first (a bounded history)."""
        return [
            PoolEvent(EVENT_KINDS[kind], buffer_id, rounded, requested)
            for kind, buffer_id, rounded, requested in self._ledger.events()
        ]

    def _check_lease(self, lease: object, op: str) -> None:
        if not isinstance(lease, Lease):
            raise TypeError(f"{op}: lease={lease!r} must be a Lease (got {type(lease).__name__})")
        if lease._pool is not self:
            raise ValueError(
                f"{op}: the lease of buffer {lease._buffer_id} was issued by another pool; "
                f"{op} it through the pool that issued it"
            )

    def _drop(self, evicted: list[int]) -> None:
        # Runs after the ledger let go of its lock: freeing a storage may be slow (a CUDA free) or
        # run arbitrary finalizers.
        storages = self._storages
        for buffer_id in evicted:
            del storages[buffer_id]

    def _place(self, device: DeviceLike, dtype: object) -> _Place:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype={dtype!r} must be a torch.dtype (got {type(dtype).__name__})")
        try:
            resolved = torch.device(device)
        except (TypeError, RuntimeError) as exc:
            raise TypeError(f"device={device!r} is not a torch device: {exc}") from None
        # An index-less accelerator device means "the current one", which may change: resolve it
        # through an empty tensor each time rather than caching it.
        stable = resolved.type == "cpu" or resolved.index is not None
        proto = torch.empty(0, dtype=dtype, device=resolved)
        resolved = proto.device
        with self._places_lock:
            device_code = self._device_codes.setdefault(resolved, len(self._device_codes))
            dtype_code = self._dtype_codes.setdefault(dtype, len(self._dtype_codes))
            place = _Place(resolved, device_code, dtype_code, proto)
            if stable:
                self._places[(device, dtype)] = place
        return place


class PythonBufferPool(LedgerPool):
    """The pure-Python buffer pool (registered as "python"): a ``LedgerPool`` on ``PythonLedger``."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        super().__init__(PythonLedger(budget_bytes))
