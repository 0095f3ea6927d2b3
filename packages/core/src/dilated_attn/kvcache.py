"""``DilatedKVCache``: the keys and values that some future query can still see, and nothing else.

Causal dilated attention is prefix-consistent (SPEC 1e): a query at position ``p`` of head ``j`` sees,
through pattern ``i``, the keys of its own segment ``[s0, p]`` (``s0 = (p // w_i) * w_i``) whose
index in the segment has the residue ``j % r_i``, and only if ``p`` itself has it. So key ``x`` of K/V
head ``c`` stays visible exactly until the last position of its segment with its residue, for the
patterns and residues that some query head reading ``c`` uses; after that it can be dropped.

Everything about that is periodic in the position with period ``P = lcm(segment_lengths)`` (every
segment ends by the next multiple of ``P``), so the cache is laid out once per pattern by a *slot
table* ``slots[c, x % P]``: the row where key ``x`` of K/V head ``c`` lives, or -1 if no query ever
sees it. The table colours the keys' visibility intervals greedily in order of position, which uses
exactly as many rows as the most keys ever visible at once: cache memory is that peak, bounded by the
segment lengths and independent of the context length. With ``max_length`` below ``P``, the table
covers positions ``[0, max_length)`` only, so patterns longer than the context cost only what the
context can see.

Each sequence's rows are a lease from a ``BufferPool`` (pinned, so the pool's byte budget bounds the
total cache): a ``(2, num_slots, head_dim)`` tensor, keys then values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from types import TracebackType

import torch

from dilated_attn.cache import metadata_cache
from dilated_attn.pattern import DilationPattern, check_mode
from dilated_attn.pool import BufferPool, Lease, PoolBudgetError
from dilated_attn.validation import check_int

# Slot tables are int32 of (num_kv_heads, period) entries; past this many positions per period the
# table itself would outweigh the cache it lays out.
MAX_TABLE_LENGTH = 1 << 24

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class KVCacheBudgetError(PoolBudgetError):
    """A sequence's cache would not fit the pool's ``budget_bytes``."""

    def __init__(self, index: int, cause: PoolBudgetError) -> None:
        super().__init__(
            cause.requested_bytes, cause.free_bytes, cause.pinned_bytes, cause.budget_bytes, cause.buffer_id
        )
        self.args = (
            f"DilatedKVCache: sequence {index} needs {cause.requested_bytes} bytes (pool bucket) of "
            f"cache, but the pool's budget_bytes={cause.budget_bytes} already holds "
            f"{cause.pinned_bytes} bytes of pinned cache: release finished sequences or raise the budget",
        )


def _positive_int(name: str, value: object) -> int:
    return check_int(name, value, minimum=1)


_SLOT_TABLES = metadata_cache("core.kv_slot_tables")


def slot_table(
    pattern: DilationPattern, mode: str, num_query_heads: int, num_kv_heads: int, table_length: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The cached :func:`build_slot_table`."""
    return _SLOT_TABLES.get_or_build(
        (pattern, mode, num_query_heads, num_kv_heads, table_length),
        lambda: build_slot_table(pattern, mode, num_query_heads, num_kv_heads, table_length),
        nbytes=lambda table: table[0].nbytes + table[1].nbytes,
    )


def build_slot_table(
    pattern: DilationPattern, mode: str, num_query_heads: int, num_kv_heads: int, table_length: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(slots, ends, num_slots)`` for positions ``[0, table_length)`` (a period or the whole context).

    ``slots`` ``(num_kv_heads, table_length)`` int32: the row of key ``x`` of K/V head ``c``, -1 if no
    query sees it. ``ends`` int64, same shape: one past the last position whose query sees it (0 when
    none). ``num_slots``: rows per sequence, the most keys visible at once.
    """
    group = num_query_heads // num_kv_heads
    x = torch.arange(table_length, dtype=torch.int64)
    ends = torch.zeros(num_kv_heads, table_length, dtype=torch.int64)
    for (w, r), heads in zip(
        zip(pattern.segment_lengths, pattern.dilation_rates), pattern.head_sets(num_query_heads, mode)
    ):
        start = x // w * w
        residue = (x - start) % r
        last = torch.clamp(start + w, max=table_length) - 1
        # The last position of the segment with the key's residue: the last query that can see it.
        last_query = last - (last - start - residue) % r
        used = torch.zeros(num_kv_heads, r, dtype=torch.bool)
        for j in heads:
            used[j // group, j % r] = True
        needed = used[:, residue]
        ends = torch.where(needed, torch.maximum(ends, last_query + 1), ends)

    # Greedy interval colouring in order of position: optimal for intervals, so the rows used equal
    # the most keys alive at once. Keys die only at the distinct end positions, so the work is per
    # stretch between consecutive ends, not per key.
    needed_t = (ends > 0).t()  # (table_length, num_kv_heads): items in position-major order
    item_pos, item_head = needed_t.nonzero(as_tuple=True)
    item_end = ends.t()[needed_t]
    item_slot = torch.empty_like(item_end)
    by_end = torch.argsort(item_end, stable=True)
    sorted_end = item_end[by_end]
    bounds = torch.unique(torch.cat([torch.tensor([0]), sorted_end])).tolist() + [table_length]
    free: list[int] = []
    num_slots = 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        lo = int(torch.searchsorted(sorted_end, torch.tensor(a)))
        hi = int(torch.searchsorted(sorted_end, torch.tensor(a), right=True))
        free.extend(item_slot[by_end[lo:hi]].tolist())
        s_lo, s_hi = (int(i) for i in torch.searchsorted(item_pos, torch.tensor([a, b])))
        count = s_hi - s_lo
        reuse = min(count, len(free))
        if reuse:
            item_slot[s_lo : s_lo + reuse] = torch.tensor(free[len(free) - reuse :])
            del free[len(free) - reuse :]
        item_slot[s_lo + reuse : s_hi] = torch.arange(num_slots, num_slots + count - reuse)
        num_slots += count - reuse
    slots = torch.full((num_kv_heads, table_length), -1, dtype=torch.int32)
    slots[item_head, item_pos] = item_slot.to(torch.int32)
    return slots, ends, num_slots


class DilatedKVCache:
    """Per-sequence K/V rows for incremental causal dilated attention (SPEC 1e).

    ``num_heads`` is the number of K/V heads stored (``h_kv``); queries may have ``num_query_heads``,
    a multiple of it (grouped-query attention, SPEC 1d: query head ``j`` reads K/V head
    ``j // (num_query_heads // num_heads)`` with offset ``j % r_i``). ``max_length`` (optional) is the
    longest sequence the cache will hold; it only shrinks the cache when some segment is longer.
    ``pool``: a ``BufferPool`` or a registered pool's name (``"auto"``); each sequence's storage is a
    pinned lease from it, so its ``budget_bytes`` bounds the cache and a full pool raises
    ``KVCacheBudgetError``.

    Feed it with ``dilated_attention_with_kvcache``. Sequences advance together, by the ``t`` tokens of
    each call; ``reset(i)`` starts sequence ``i`` over (so lengths in a batch may differ) and
    ``release(i)`` gives its storage back.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int] | DilationPattern,
        dilation_rates: Sequence[int] | None = None,
        *,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        mode: str = "longnet",
        max_length: int | None = None,
        num_query_heads: int | None = None,
        pool: BufferPool | str = "auto",
    ) -> None:
        self.pattern = DilationPattern.of(segment_lengths, dilation_rates)
        self.mode = check_mode(mode)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        query_heads = num_heads if num_query_heads is None else num_query_heads
        if _positive_int("num_query_heads", query_heads) % num_heads:
            raise ValueError(
                f"num_query_heads={query_heads} must be a multiple of num_heads={num_heads} "
                "(the K/V heads the cache stores)"
            )
        self.num_query_heads = query_heads
        if dtype not in _DTYPES:
            raise TypeError(f"dtype={dtype} must be one of {_DTYPES}")
        self.dtype = dtype
        self.device = torch.empty(0, device=device).device
        period = math.lcm(*self.pattern.segment_lengths)
        if max_length is not None:
            _positive_int("max_length", max_length)
        self.max_length = max_length
        self.table_length = period if max_length is None else min(period, max_length)
        if self.table_length > MAX_TABLE_LENGTH:
            raise ValueError(
                f"segment_lengths={list(self.pattern.segment_lengths)} repeat every lcm={period} "
                f"positions, over the {MAX_TABLE_LENGTH} a slot table may cover: pass "
                f"max_length <= {MAX_TABLE_LENGTH}"
            )
        slots, ends, self.num_slots = slot_table(
            self.pattern, self.mode, query_heads, num_heads, self.table_length
        )
        self.slots = slots.to(self.device)
        self.ends = ends.to(self.device)
        if isinstance(pool, str):
            from dilated_attn.registry import get_pool

            pool = get_pool(pool).factory()
        if not isinstance(pool, BufferPool):
            raise TypeError(f"pool={pool!r} must be a BufferPool or a registered pool's name")
        self.pool = pool
        # Kernels address every sequence's rows from this anchor plus a per-sequence element offset,
        # so one launch covers a batch whose storages are separate leases.
        self._anchor = torch.empty(1, dtype=dtype, device=self.device)
        self._offsets_host = [0] * batch_size
        self.offsets = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        self._host_lengths = [0] * batch_size
        self._leases: list[Lease | None] = [None] * batch_size
        try:
            self.reset()
        except BaseException:
            self.release()
            raise

    # -- storage ---------------------------------------------------------------------------------

    def _indices(self, index: int | Iterable[int] | None) -> list[int]:
        if index is None:
            return list(range(self.batch_size))
        indices = [index] if isinstance(index, int) else list(index)
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.batch_size:
                raise ValueError(f"index={i!r} must be an int in [0, batch_size={self.batch_size})")
        return indices

    def reset(self, index: int | Iterable[int] | None = None) -> None:
        """Start sequence ``index`` (all by default) over at length 0, acquiring storage if released."""
        indices = self._indices(index)
        for i in indices:
            if self._leases[i] is None:
                self._acquire(i)
            self._host_lengths[i] = 0
        self.lengths[indices] = 0
        self.offsets.copy_(torch.tensor(self._offsets_host, dtype=torch.int64))

    def release(self, index: int | Iterable[int] | None = None) -> None:
        """Sequence ``index`` (all by default) is finished: its storage goes back to the pool."""
        for i in self._indices(index):
            lease = self._leases[i]
            if lease is not None:
                self._leases[i] = None
                self.pool.unpin(lease)
                self.pool.release(lease)

    def _acquire(self, i: int) -> None:
        lease = self.pool.acquire((2, self.num_slots, self.head_dim), self.dtype, self.device)
        try:
            self.pool.pin(lease)
        except PoolBudgetError as exc:
            self.pool.release(lease)
            raise KVCacheBudgetError(i, exc) from None
        self._leases[i] = lease
        delta = lease.tensor.data_ptr() - self._anchor.data_ptr()
        itemsize = self.dtype.itemsize
        if delta % itemsize:
            raise RuntimeError(f"cache storage of sequence {i} is not aligned to its dtype {self.dtype}")
        self._offsets_host[i] = delta // itemsize

    def storage(self, index: int) -> torch.Tensor:
        """Sequence ``index``'s rows ``(2, num_slots, head_dim)``: keys then values, by slot."""
        lease = self._leases[index]
        if lease is None:
            raise ValueError(f"sequence {index} was released; reset({index}) starts it again")
        return lease.tensor

    def held(self) -> bool:
        """Whether every sequence of the batch holds storage (attention needs them all)."""
        return all(lease is not None for lease in self._leases)

    @property
    def anchor(self) -> torch.Tensor:
        return self._anchor

    # -- sizes -----------------------------------------------------------------------------------

    @property
    def length(self) -> torch.Tensor:
        """Tokens appended to each sequence ``(batch_size,)`` int64 (CPU), as the Python calls counted.

        A captured CUDA graph replayed outside Python advances ``lengths`` (the device copy the kernels
        read) but not this count.
        """
        return torch.tensor(self._host_lengths, dtype=torch.int64)

    @property
    def nbytes(self) -> int:
        """Bytes of K/V storage the held sequences requested (the pool may round its buffers up)."""
        return sum(lease.nbytes for lease in self._leases if lease is not None)

    def _advance(self, t: int) -> None:
        for i in range(self.batch_size):
            self._host_lengths[i] += t

    def close(self) -> None:
        """Release every sequence's storage."""
        self.release()

    def __enter__(self) -> DilatedKVCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DilatedKVCache(segment_lengths={list(self.pattern.segment_lengths)}, "
            f"dilation_rates={list(self.pattern.dilation_rates)}, mode={self.mode!r}, "
            f"batch_size={self.batch_size}, num_heads={self.num_heads}, "
            f"num_query_heads={self.num_query_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
            f"num_slots={self.num_slots}, nbytes={self.nbytes})"
        )


__all__ = ["DilatedKVCache", "KVCacheBudgetError", "MAX_TABLE_LENGTH", "slot_table"]
