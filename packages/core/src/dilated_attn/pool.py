"""Buffer pools: reusable storage for attention workspaces, with a byte budget.

Every pool (``PythonBufferPool`` here, ``dilated_attn_pool.RustBufferPool`` in the pool-rs package)
implements exactly these semantics and reports the same ``stats()`` keys.

Buffers and buckets
    A buffer is a raw byte storage (``torch.UntypedStorage``) owned by the pool and named by an int
    ``buffer_id``, unique over the pool's lifetime (ids count up from 0 and are never reused). It
    belongs to the bucket ``(device, dtype, round_bytes(nbytes))``, where ``nbytes`` is the request's
    size in bytes. Rounding follows PyTorch's CUDA caching allocator with 4 power-of-two divisions
    above 1 MiB (``roundup_power2_divisions`` set to 4 for sizes over 1 MiB):

    - ``nbytes <= 1 MiB``: up to a multiple of 512 bytes, at least 512 (so 0 bytes -> 512);
    - ``nbytes > 1 MiB`` and a power of two: ``nbytes`` itself;
    - otherwise, with ``p`` the largest power of two ``<= nbytes``: up to a multiple of ``p / 4``
      (e.g. 1 MiB + 1 byte -> 1.25 MiB, 5 MiB -> 5 MiB, 5 MiB + 1 byte -> 6 MiB).

States
    A buffer is *leased* (a live ``Lease`` holds it), *pinned* (pin count > 0) or *free* (neither).
    A leased or pinned buffer is never handed out again and never evicted; one storage never has two
    live leases.

acquire(shape, dtype, device)
    Takes the most recently freed buffer of the request's bucket (warm): a *hit*. With none free, it
    allocates a new buffer: a *miss*. The lease's ``tensor`` is a contiguous ``shape``/``dtype`` view of
    the buffer's first ``nbytes`` bytes; the contents are whatever the last holder left.

release(lease)
    The buffer becomes free, at the most-recently-used end of one LRU over all free buffers (unless it
    is pinned: then it becomes free when its last pin goes). Releasing a lease twice, a lease of
    another pool or one whose buffer is unknown raises ``ValueError`` naming the buffer id.

pin(lease) / unpin(lease)
    Pins count. ``pin`` takes a held (not yet released) lease. ``unpin`` takes the lease that pinned,
    released or not; unpinning a buffer that is not pinned raises ``ValueError``, as does unpinning
    through an older lease of a buffer that has been leased again.

Budget
    ``budget_bytes`` (``None``: unbounded) bounds the *free* bytes. After every release, unpin and trim
    the least recently used free buffers are evicted until ``free_bytes <= budget_bytes``; evicted
    storages are dropped after the bookkeeping lock is let go. Pinned buffers cannot be evicted, so
    the *pinned set* (every pinned buffer, held or idle: the bytes the pool would keep idle beyond the
    budget once all leases are released) must fit the budget too: ``pin`` of a buffer that is not yet
    pinned raises ``PoolBudgetError`` when ``pinned_bytes + its rounded bytes > budget_bytes``, and
    changes nothing. Re-pinning a pinned buffer never raises.

trim(target_bytes=0)
    Evicts least recently used free buffers until ``free_bytes <= target_bytes``; returns the bytes
    evicted (rounded sizes).

stats()
    ``hits``, ``misses``, ``evictions`` (buffers evicted, by the budget or by ``trim``) and, in bytes of
    rounded buffer sizes unless said otherwise: ``reserved_bytes`` (every buffer the pool holds),
    ``in_use_bytes`` (leased buffers), ``requested_bytes`` (the requested, unrounded ``nbytes`` of live
    leases), ``free_bytes``, ``pinned_bytes`` (pinned buffers, held or idle), ``peak_reserved_bytes``,
    ``peak_in_use_bytes``, and the counts ``num_buffers`` and ``num_free``. As in PyTorch's
    ``memory_stats``, "reserved" is what the pool holds and "requested" what callers asked for.

Thread safety
    One lock guards the bookkeeping; no user code, allocation or storage release runs under it.

The bookkeeping is a *ledger* (``PoolLedger``): integers in, integers out. ``LedgerPool`` puts the
``BufferPool`` protocol, the storages and the tensor views on top of any ledger, so a ledger written
in another language (pool-rs) shares everything above it.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from types import TracebackType
from typing import NamedTuple, Protocol, runtime_checkable

import torch

MIN_BLOCK_BYTES = 512
LARGE_BYTES = 1 << 20
ROUNDUP_DIVISIONS = 4
# Requests at or above this are refused before any rounding, so every ledger computes with 64-bit
# unsigned integers without overflow.
MAX_REQUEST_BYTES = 1 << 62

STATS_KEYS = (
    "hits",
    "misses",
    "evictions",
    "reserved_bytes",
    "in_use_bytes",
    "requested_bytes",
    "free_bytes",
    "pinned_bytes",
    "peak_reserved_bytes",
    "peak_in_use_bytes",
    "num_buffers",
    "num_free",
)

# Event kinds of a ledger's history ring, by code.
EVENT_KINDS = ("alloc", "reuse", "release", "pin", "unpin", "evict", "abandon")
_ALLOC, _REUSE, _RELEASE, _PIN, _UNPIN, _EVICT, _ABANDON = range(len(EVENT_KINDS))
DEFAULT_EVENT_CAPACITY = 1024

DeviceLike = torch.device | str | int


def round_bytes(nbytes: int) -> int:
    """The bucket size in bytes of a request of ``nbytes`` bytes (see the module docstring)."""
    if nbytes <= LARGE_BYTES:
        return max(MIN_BLOCK_BYTES, -(-nbytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES)
    floor = 1 << (nbytes.bit_length() - 1)
    if floor == nbytes:
        return nbytes
    step = floor // ROUNDUP_DIVISIONS
    return -(-nbytes // step) * step


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
    """What attention backends ask of a pool; semantics in this module's docstring."""

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
    storages the caller drops. Misuse raises ``ValueError`` with the messages of ``_refusal``.
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


def _refusal(op: str, buffer_id: int, rule: str) -> ValueError:
    """The one wording of ledger misuse; the Rust ledger formats the same strings."""
    if rule == "unknown":
        return ValueError(
            f"{op}: buffer {buffer_id} is not held by this pool (it was evicted, or never issued "
            "here); pass a lease that this pool issued"
        )
    if rule == "released":
        advice = {
            "release": "release each lease exactly once",
            "pin": "pin a lease while it is held",
            "abandon": "abandon a lease only before releasing it",
        }[op]
        return ValueError(f"{op}: the lease of buffer {buffer_id} was already released; {advice}")
    if rule == "stale":
        return ValueError(
            f"{op}: the lease of buffer {buffer_id} is stale (the buffer was leased again); "
            f"{op} through the lease that pinned it"
        )
    return ValueError(f"{op}: buffer {buffer_id} is not pinned; unpin once per pin")


class _Buffer:
    __slots__ = ("key", "rounded", "requested", "serial", "leased", "pins")

    def __init__(self, key: tuple[int, int, int], serial: int, requested: int) -> None:
        self.key = key
        self.rounded = key[2]
        self.requested = requested
        self.serial = serial
        self.leased = True
        self.pins = 0


class PythonLedger:
    """The reference ledger in pure Python (``PoolLedger``)."""

    def __init__(self, budget_bytes: int | None = None, event_capacity: int = DEFAULT_EVENT_CAPACITY) -> None:
        self._budget = check_budget(budget_bytes)
        self._lock = threading.Lock()
        self._buffers: dict[int, _Buffer] = {}
        # Free ids per bucket, oldest first; a bucket's order is the LRU's order restricted to it,
        # so the LRU's oldest buffer is always the first of its bucket.
        self._free: dict[tuple[int, int, int], deque[int]] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._events: deque[tuple[int, int, int, int]] = deque(maxlen=event_capacity)
        self._next_id = 0
        self._next_serial = 0
        self._hits = self._misses = self._evictions = 0
        self._reserved = self._in_use = self._requested = self._free_bytes = self._pinned = 0
        self._peak_reserved = self._peak_in_use = 0

    @property
    def budget_bytes(self) -> int | None:
        return self._budget

    def acquire(self, device: int, dtype: int, nbytes: int) -> tuple[int, int, int]:
        if nbytes >= MAX_REQUEST_BYTES:
            raise ValueError(f"acquire: nbytes={nbytes} is too large; a request must be under 2**62 bytes")
        key = (device, dtype, round_bytes(nbytes))
        rounded = key[2]
        with self._lock:
            serial = self._next_serial
            self._next_serial += 1
            bucket = self._free.get(key)
            if bucket:
                buffer_id = bucket.pop()
                del self._lru[buffer_id]
                buf = self._buffers[buffer_id]
                buf.serial, buf.requested, buf.leased = serial, nbytes, True
                self._free_bytes -= rounded
                self._hits += 1
                alloc, kind = 0, _REUSE
            else:
                buffer_id = self._next_id
                self._next_id += 1
                self._buffers[buffer_id] = _Buffer(key, serial, nbytes)
                self._reserved += rounded
                self._peak_reserved = max(self._peak_reserved, self._reserved)
                self._misses += 1
                alloc, kind = rounded, _ALLOC
            self._in_use += rounded
            self._peak_in_use = max(self._peak_in_use, self._in_use)
            self._requested += nbytes
            self._events.append((kind, buffer_id, rounded, nbytes))
        return buffer_id, serial, alloc

    def abandon(self, buffer_id: int, serial: int) -> None:
        with self._lock:
            buf = self._held(buffer_id, serial, "abandon")
            del self._buffers[buffer_id]
            self._reserved -= buf.rounded
            self._in_use -= buf.rounded
            self._requested -= buf.requested
            if buf.pins:
                self._pinned -= buf.rounded
            self._events.append((_ABANDON, buffer_id, buf.rounded, buf.requested))

    def release(self, buffer_id: int, serial: int) -> list[int]:
        with self._lock:
            buf = self._held(buffer_id, serial, "release")
            buf.leased = False
            self._in_use -= buf.rounded
            self._requested -= buf.requested
            self._events.append((_RELEASE, buffer_id, buf.rounded, buf.requested))
            if buf.pins:
                return []
            self._make_free(buffer_id, buf)
            return self._evict_to(self._budget)

    def pin(self, buffer_id: int, serial: int) -> tuple[int, int, int, int] | None:
        with self._lock:
            buf = self._held(buffer_id, serial, "pin")
            if buf.pins == 0:
                budget = self._budget
                if budget is not None and self._pinned + buf.rounded > budget:
                    return buf.rounded, self._free_bytes, self._pinned, budget
                self._pinned += buf.rounded
            buf.pins += 1
            self._events.append((_PIN, buffer_id, buf.rounded, 0))
            return None

    def unpin(self, buffer_id: int, serial: int) -> list[int]:
        with self._lock:
            buf = self._buffers.get(buffer_id)
            if buf is None:
                raise _refusal("unpin", buffer_id, "unknown")
            if buf.serial != serial:
                raise _refusal("unpin", buffer_id, "stale")
            if buf.pins == 0:
                raise _refusal("unpin", buffer_id, "not pinned")
            buf.pins -= 1
            self._events.append((_UNPIN, buffer_id, buf.rounded, 0))
            if buf.pins:
                return []
            self._pinned -= buf.rounded
            if buf.leased:
                return []
            self._make_free(buffer_id, buf)
            return self._evict_to(self._budget)

    def trim(self, target_bytes: int) -> tuple[int, list[int]]:
        with self._lock:
            before = self._free_bytes
            evicted = self._evict_to(target_bytes)
            return before - self._free_bytes, evicted

    def stats(self) -> tuple[int, ...]:
        with self._lock:
            return (
                self._hits,
                self._misses,
                self._evictions,
                self._reserved,
                self._in_use,
                self._requested,
                self._free_bytes,
                self._pinned,
                self._peak_reserved,
                self._peak_in_use,
                len(self._buffers),
                len(self._lru),
            )

    def events(self) -> list[tuple[int, int, int, int]]:
        with self._lock:
            return list(self._events)

    def _held(self, buffer_id: int, serial: int, op: str) -> _Buffer:
        buf = self._buffers.get(buffer_id)
        if buf is None:
            raise _refusal(op, buffer_id, "unknown")
        if buf.serial != serial or not buf.leased:
            raise _refusal(op, buffer_id, "released")
        return buf

    def _make_free(self, buffer_id: int, buf: _Buffer) -> None:
        bucket = self._free.get(buf.key)
        if bucket is None:
            bucket = self._free[buf.key] = deque()
        bucket.append(buffer_id)
        self._lru[buffer_id] = None
        self._free_bytes += buf.rounded

    def _evict_to(self, limit: int | None) -> list[int]:
        evicted: list[int] = []
        if limit is None:
            return evicted
        while self._free_bytes > limit:
            buffer_id, _ = self._lru.popitem(last=False)
            buf = self._buffers.pop(buffer_id)
            bucket = self._free[buf.key]
            bucket.popleft()
            if not bucket:
                del self._free[buf.key]
            self._free_bytes -= buf.rounded
            self._reserved -= buf.rounded
            self._evictions += 1
            self._events.append((_EVICT, buffer_id, buf.rounded, 0))
            evicted.append(buffer_id)
        return evicted


def check_budget(budget_bytes: object) -> int | None:
    """``budget_bytes`` as a pool takes it: ``None`` (unbounded) or an int in ``[0, 2**62)``."""
    if budget_bytes is None:
        return None
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
        raise TypeError(
            f"budget_bytes={budget_bytes!r} must be an int or None (got {type(budget_bytes).__name__})"
        )
    if not 0 <= budget_bytes < MAX_REQUEST_BYTES:
        raise ValueError(f"budget_bytes={budget_bytes} must be >= 0 and < 2**62 (or None: unbounded)")
    return budget_bytes


def _check_shape(shape: object) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape={shape!r} must be a sequence of non-negative ints")
    for i, dim in enumerate(shape):
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"shape[{i}]={dim!r} must be an int (got {type(dim).__name__})")
        if dim < 0:
            raise ValueError(f"shape[{i}]={dim} must be >= 0")
    return tuple(shape)


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
    """A ``BufferPool`` over a ``PoolLedger``: it owns the storages and makes the tensor views."""

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
            raise _refusal("release", lease._buffer_id, "released")
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


__all__ = [
    "BufferPool",
    "DEFAULT_EVENT_CAPACITY",
    "EVENT_KINDS",
    "Lease",
    "LedgerPool",
    "MAX_REQUEST_BYTES",
    "PoolBudgetError",
    "PoolEvent",
    "PoolLedger",
    "PythonBufferPool",
    "PythonLedger",
    "STATS_KEYS",
    "check_budget",
    "round_bytes",
]
