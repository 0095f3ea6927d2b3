"""The pool's bookkeeping in pure Python, and the one source of the ledger's constants and texts.

``dilated_attn_pool._pool_rs`` exports the same names (``STATS_KEYS``, ``EVENT_KINDS``, the rounding
and limit constants, ``REFUSAL_SAMPLES``); ``dilated_attn_pool`` compares them with these at import
and refuses to load when they differ, so the two ledgers cannot drift apart.
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict, deque

MIN_BLOCK_BYTES = 512
LARGE_BYTES = 1 << 20
ROUNDUP_DIVISIONS = 4
# Requests at or above this are refused before any rounding, so rounding never leaves 64 bits.
MAX_REQUEST_BYTES = 1 << 62
# A miss that would take reserved_bytes above this is refused (MemoryError): every byte total
# (reserved >= in_use >= requested, free, pinned, the peaks) then fits an unsigned 64-bit integer,
# so the Rust ledger's counters cannot wrap and both ledgers report the same numbers.
MAX_RESERVED_BYTES = 1 << 63
DEFAULT_EVENT_CAPACITY = 1024
# The event ring's capacity is bounded so that a ledger's history cannot ask for unbounded memory.
MAX_EVENT_CAPACITY = 1 << 20
# Buffer ids, serials and byte counts cross the boundary as unsigned 64-bit integers; device and
# dtype codes as unsigned 32-bit ones.
U64_LIMIT = 1 << 64
U32_LIMIT = 1 << 32

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


def round_bytes(nbytes: int) -> int:
    """The bucket size in bytes of a request of ``nbytes`` bytes (see ``dilated_attn.pool``)."""
    if nbytes <= LARGE_BYTES:
        return max(MIN_BLOCK_BYTES, -(-nbytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES)
    floor = 1 << (nbytes.bit_length() - 1)
    if floor == nbytes:
        return nbytes
    step = floor // ROUNDUP_DIVISIONS
    return -(-nbytes // step) * step


def check_int(op: str, name: str, value: object, limit: int = U64_LIMIT) -> int:
    """``value`` as an unsigned integer below ``limit`` (``2**64`` or ``2**32``), or why not.

    An int or any object with ``__index__`` (a numpy integer) other than a bool is accepted. The
    classes are the boundary's contract, the same in the Rust ledger: a non-int is a ``TypeError``,
    a negative int a ``ValueError``, one that does not fit ``limit`` an ``OverflowError``.
    """
    if type(value) is int and 0 <= value < limit:
        return value
    index = _index(value)
    if index is None:
        raise TypeError(f"{op}: {name}={value!r} must be an int (got {type(value).__name__})")
    if index < 0:
        raise ValueError(f"{op}: {name}={value} must be >= 0")
    if index >= limit:
        bits = limit.bit_length() - 1
        raise OverflowError(
            f"{op}: {name}={value} does not fit an unsigned {bits}-bit integer (must be < 2**{bits})"
        )
    return index


def _index(value: object) -> int | None:
    """``operator.index(value)`` for anything but a bool, else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def check_budget(budget_bytes: object) -> int | None:
    """``budget_bytes`` as a pool takes it: ``None`` (unbounded) or an int in ``[0, 2**62)``."""
    if budget_bytes is None:
        return None
    index = _index(budget_bytes)
    if index is None:
        raise TypeError(
            f"budget_bytes={budget_bytes!r} must be an int or None (got {type(budget_bytes).__name__})"
        )
    if not 0 <= index < MAX_REQUEST_BYTES:
        raise ValueError(f"budget_bytes={budget_bytes} must be >= 0 and < 2**62 (or None: unbounded)")
    return index


def check_event_capacity(event_capacity: object) -> int:
    """``event_capacity`` as a ledger takes it: an int in ``[0, MAX_EVENT_CAPACITY]``."""
    capacity = check_int("Ledger", "event_capacity", event_capacity)
    if capacity > MAX_EVENT_CAPACITY:
        raise ValueError(
            f"Ledger: event_capacity={capacity} must be <= {MAX_EVENT_CAPACITY} (2**20): the event "
            "history is a bounded ring"
        )
    return capacity


def check_request(nbytes: object) -> int:
    """``nbytes`` as ``acquire`` takes it: an int in ``[0, MAX_REQUEST_BYTES)``."""
    value = check_int("acquire", "nbytes", nbytes)
    if value >= MAX_REQUEST_BYTES:
        raise ValueError(f"acquire: nbytes={value} is too large; a request must be under 2**62 bytes")
    return value


def over_reserve(nbytes: int, rounded: int, reserved: int) -> MemoryError:
    """The refusal of a miss that would take ``reserved_bytes`` over ``MAX_RESERVED_BYTES``."""
    return MemoryError(
        f"acquire: nbytes={nbytes} needs a new buffer of {rounded} bytes, which would make "
        f"reserved_bytes {reserved + rounded}, over the ledger's limit of 2**63; release or trim "
        "buffers first"
    )


def refusal(op: str, buffer_id: int, rule: str) -> ValueError:
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


# Every (op, rule) pair a ledger can refuse with; REFUSAL_SAMPLES formats each for buffer 7.
REFUSAL_RULES = (
    ("release", "unknown"),
    ("pin", "unknown"),
    ("unpin", "unknown"),
    ("abandon", "unknown"),
    ("release", "released"),
    ("pin", "released"),
    ("abandon", "released"),
    ("unpin", "stale"),
    ("unpin", "not pinned"),
)
REFUSAL_SAMPLES = tuple((op, rule, str(refusal(op, 7, rule))) for op, rule in REFUSAL_RULES)


class _Buffer:
    __slots__ = ("key", "rounded", "requested", "serial", "leased", "pins", "peaks_before")

    def __init__(
        self, key: tuple[int, int, int], serial: int, requested: int, peaks_before: tuple[int, int]
    ) -> None:
        self.key = key
        self.rounded = key[2]
        self.requested = requested
        self.serial = serial
        self.leased = True
        self.pins = 0
        # The peaks as they were before this buffer's allocating lease, while that lease is held:
        # abandoning the lease (its storage could not be allocated) restores them.
        self.peaks_before: tuple[int, int] | None = peaks_before


class PythonLedger:
    """The reference ledger in pure Python (``PoolLedger``)."""

    def __init__(self, budget_bytes: int | None = None, event_capacity: int = DEFAULT_EVENT_CAPACITY) -> None:
        self._budget = check_budget(budget_bytes)
        capacity = check_event_capacity(event_capacity)
        self._lock = threading.Lock()
        self._buffers: dict[int, _Buffer] = {}
        # Free ids per bucket, oldest first; a bucket's order is the LRU's order restricted to it,
        # so the LRU's oldest buffer is always the first of its bucket.
        self._free: dict[tuple[int, int, int], deque[int]] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._events: deque[tuple[int, int, int, int]] = deque(maxlen=capacity)
        self._next_id = 0
        self._next_serial = 0
        self._hits = self._misses = self._evictions = 0
        self._reserved = self._in_use = self._requested = self._free_bytes = self._pinned = 0
        self._peak_reserved = self._peak_in_use = 0

    @property
    def budget_bytes(self) -> int | None:
        return self._budget

    def acquire(self, device: int, dtype: int, nbytes: int) -> tuple[int, int, int]:
        device = check_int("acquire", "device", device, U32_LIMIT)
        dtype = check_int("acquire", "dtype", dtype, U32_LIMIT)
        nbytes = check_request(nbytes)
        key = (device, dtype, round_bytes(nbytes))
        rounded = key[2]
        with self._lock:
            bucket = self._free.get(key)
            if bucket:
                buffer_id = bucket.pop()
                del self._lru[buffer_id]
                buf = self._buffers[buffer_id]
                serial = self._take_serial()
                buf.serial, buf.requested, buf.leased = serial, nbytes, True
                self._free_bytes -= rounded
                self._hits += 1
                alloc, kind = 0, _REUSE
            else:
                if self._reserved + rounded > MAX_RESERVED_BYTES:
                    raise over_reserve(nbytes, rounded, self._reserved)
                serial = self._take_serial()
                buffer_id = self._next_id
                self._next_id += 1
                peaks = (self._peak_reserved, self._peak_in_use)
                self._buffers[buffer_id] = _Buffer(key, serial, nbytes, peaks)
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
        buffer_id, serial = self._lease_args("abandon", buffer_id, serial)
        with self._lock:
            buf = self._held(buffer_id, serial, "abandon")
            del self._buffers[buffer_id]
            self._reserved -= buf.rounded
            self._in_use -= buf.rounded
            self._requested -= buf.requested
            if buf.pins:
                self._pinned -= buf.rounded
            if buf.peaks_before is not None:
                # The storage never existed: take it out of the peaks it raised. A peak set by
                # another lease since then counted these bytes too, so it drops by them as well.
                reserved_before, in_use_before = buf.peaks_before
                self._peak_reserved = max(reserved_before, self._peak_reserved - buf.rounded)
                self._peak_in_use = max(in_use_before, self._peak_in_use - buf.rounded)
            self._events.append((_ABANDON, buffer_id, buf.rounded, buf.requested))

    def release(self, buffer_id: int, serial: int) -> list[int]:
        buffer_id, serial = self._lease_args("release", buffer_id, serial)
        with self._lock:
            buf = self._held(buffer_id, serial, "release")
            buf.leased = False
            buf.peaks_before = None
            self._in_use -= buf.rounded
            self._requested -= buf.requested
            self._events.append((_RELEASE, buffer_id, buf.rounded, buf.requested))
            if buf.pins:
                return []
            self._make_free(buffer_id, buf)
            return self._evict_to(self._budget)

    def pin(self, buffer_id: int, serial: int) -> tuple[int, int, int, int] | None:
        buffer_id, serial = self._lease_args("pin", buffer_id, serial)
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
        buffer_id, serial = self._lease_args("unpin", buffer_id, serial)
        with self._lock:
            buf = self._buffers.get(buffer_id)
            if buf is None:
                raise refusal("unpin", buffer_id, "unknown")
            if buf.serial != serial:
                raise refusal("unpin", buffer_id, "stale")
            if buf.pins == 0:
                raise refusal("unpin", buffer_id, "not pinned")
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
        target_bytes = check_int("trim", "target_bytes", target_bytes)
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

    def _take_serial(self) -> int:
        serial = self._next_serial
        self._next_serial += 1
        return serial

    @staticmethod
    def _lease_args(op: str, buffer_id: object, serial: object) -> tuple[int, int]:
        return check_int(op, "buffer_id", buffer_id), check_int(op, "serial", serial)

    def _held(self, buffer_id: int, serial: int, op: str) -> _Buffer:
        buf = self._buffers.get(buffer_id)
        if buf is None:
            raise refusal(op, buffer_id, "unknown")
        if buf.serial != serial or not buf.leased:
            raise refusal(op, buffer_id, "released")
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
