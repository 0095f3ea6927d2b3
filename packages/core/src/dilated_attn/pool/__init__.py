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

Limits
    A request of ``MAX_REQUEST_BYTES`` (2**62) bytes or more raises ``ValueError``; a miss that would
    take ``reserved_bytes`` over ``MAX_RESERVED_BYTES`` (2**63) raises ``MemoryError``. Every byte
    total is then below 2**64, so no ledger's counter wraps and every ledger reports the same
    numbers. A refused call changes nothing. A miss whose storage cannot be allocated (torch raises)
    is rolled back: the buffer is forgotten and the peaks it raised are taken back down.

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

Modules: ``protocol`` (the protocols, ``Lease``, ``PoolBudgetError``, ``PoolEvent``), ``ledger``
(``PythonLedger``, rounding, and the constants and refusal texts both ledgers share), ``storage``
(``LedgerPool``, ``PythonBufferPool``).
"""

from dilated_attn.pool.ledger import (
    DEFAULT_EVENT_CAPACITY,
    EVENT_KINDS,
    LARGE_BYTES,
    MAX_EVENT_CAPACITY,
    MAX_REQUEST_BYTES,
    MAX_RESERVED_BYTES,
    MIN_BLOCK_BYTES,
    ROUNDUP_DIVISIONS,
    STATS_KEYS,
    PythonLedger,
    check_budget,
    round_bytes,
)
from dilated_attn.pool.protocol import BufferPool, DeviceLike, Lease, PoolBudgetError, PoolEvent, PoolLedger
from dilated_attn.pool.storage import LedgerPool, PythonBufferPool

__all__ = [
    "BufferPool",
    "DEFAULT_EVENT_CAPACITY",
    "DeviceLike",
    "EVENT_KINDS",
    "LARGE_BYTES",
    "Lease",
    "LedgerPool",
    "MAX_EVENT_CAPACITY",
    "MAX_REQUEST_BYTES",
    "MAX_RESERVED_BYTES",
    "MIN_BLOCK_BYTES",
    "PoolBudgetError",
    "PoolEvent",
    "PoolLedger",
    "PythonBufferPool",
    "PythonLedger",
    "ROUNDUP_DIVISIONS",
    "STATS_KEYS",
    "check_budget",
    "round_bytes",
]
