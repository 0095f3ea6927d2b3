"""The BufferPool semantics of ``dilated_attn.pool``, run on every pool implementation."""

from __future__ import annotations

import pytest
import torch
from dilated_attn.pool import STATS_KEYS, BufferPool, Lease, PoolBudgetError, PythonBufferPool
from dilated_attn.pool import storage as pool_module

F32 = torch.float32


def data_range(lease: Lease) -> tuple[int, int]:
    t = lease.tensor
    return t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()


def test_implements_the_protocol(make_pool) -> None:
    pool = make_pool()
    assert isinstance(pool, BufferPool)
    assert pool.budget_bytes is None
    assert make_pool(budget_bytes=4096).budget_bytes == 4096
    assert tuple(pool.stats()) == STATS_KEYS


def test_lease_tensor_is_a_contiguous_view_of_the_request(make_pool) -> None:
    pool = make_pool()
    lease = pool.acquire((3, 5, 7), torch.bfloat16, "cpu")
    t = lease.tensor
    assert (tuple(t.shape), t.dtype, t.device.type, t.is_contiguous()) == (
        (3, 5, 7),
        torch.bfloat16,
        "cpu",
        True,
    )
    assert lease.nbytes == 3 * 5 * 7 * 2
    assert not lease.released and not t.requires_grad
    assert pool.stats()["requested_bytes"] == lease.nbytes
    assert pool.stats()["in_use_bytes"] == 512
    empty = pool.acquire((0, 4), F32, torch.device("cpu"))
    assert empty.tensor.shape == (0, 4) and empty.nbytes == 0
    assert pool.stats()["reserved_bytes"] == 1024


def test_release_then_acquire_reuses_the_warmest_buffer(make_pool) -> None:
    pool = make_pool()
    a = pool.acquire((100,), F32, "cpu")
    b = pool.acquire((100,), F32, "cpu")
    a.tensor.fill_(1.0)
    b.tensor.fill_(2.0)
    a.release()
    pool.release(b)
    again = pool.acquire((64,), F32, "cpu")  # 256 bytes: the same 512-byte bucket
    assert again.buffer_id == b.buffer_id
    assert again.tensor.data_ptr() == b.tensor.data_ptr()
    assert torch.all(again.tensor == 2.0)  # contents are what the last holder left
    stats = pool.stats()
    assert (stats["hits"], stats["misses"], stats["num_buffers"], stats["num_free"]) == (1, 2, 2, 1)


def test_a_holder_cannot_taint_the_next_holders_tensor(make_pool) -> None:
    pool = make_pool()
    first = pool.acquire((4, 8), F32, "cpu")
    first.tensor.copy_(torch.ones(4, 8, requires_grad=True))  # attaches autograd history
    assert first.tensor.grad_fn is not None
    first.tensor.unsqueeze_(0)
    first.release()
    second = pool.acquire((4, 8), F32, "cpu")
    assert second.buffer_id == first.buffer_id
    t = second.tensor
    assert (tuple(t.shape), t.requires_grad, t.grad_fn, t.is_contiguous()) == ((4, 8), False, None, True)
    assert t.data_ptr() == first.tensor.data_ptr() and torch.all(t == 1.0)
    t.requires_grad_(True)
    second.release()
    third = pool.acquire((8, 4), F32, "cpu")
    assert third.buffer_id == first.buffer_id
    assert (tuple(third.tensor.shape), third.tensor.requires_grad) == ((8, 4), False)


def test_buckets_separate_dtype_device_and_size(make_pool) -> None:
    pool = make_pool()
    first = pool.acquire((128,), F32, "cpu")
    first.release()
    for shape, dtype in [((128,), torch.int32), ((256,), torch.float16), ((129,), F32)]:
        other = pool.acquire(shape, dtype, "cpu")
        assert other.buffer_id != first.buffer_id
    assert pool.stats()["misses"] == 4
    assert pool.acquire((128,), F32, "cpu").buffer_id == first.buffer_id


def test_live_leases_never_alias(make_pool) -> None:
    pool = make_pool()
    sizes = [1, 7, 128, 128, 129, 1000, 128, 3, 128]
    leases = []
    for rounds in range(3):
        leases += [pool.acquire((n,), F32, "cpu") for n in sizes]
        for i, lease in enumerate(leases):
            lease.tensor.fill_(float(i))
        ranges = sorted(data_range(lease) for lease in leases if lease.nbytes)
        assert all(end <= start for (_, end), (start, _) in zip(ranges, ranges[1:]))
        assert len({lease.buffer_id for lease in leases}) == len(leases)
        assert all(torch.all(lease.tensor == float(i)) for i, lease in enumerate(leases))
        for lease in leases[::2]:
            lease.release()
        leases = leases[1::2]
        assert rounds == 2 or pool.stats()["num_free"] > 0


def test_context_manager_releases_once(make_pool) -> None:
    pool = make_pool()
    with pool.acquire((16,), F32, "cpu") as lease:
        assert not lease.released
    assert lease.released and pool.stats()["in_use_bytes"] == 0
    with pool.acquire((16,), F32, "cpu") as inner:
        inner.release()
    assert pool.stats()["num_free"] == 1


def test_double_release_names_the_buffer_and_the_rule(make_pool) -> None:
    pool = make_pool()
    lease = pool.acquire((8,), F32, "cpu")
    lease.release()
    with pytest.raises(
        ValueError,
        match=rf"release: the lease of buffer {lease.buffer_id} was already released; release each lease exactly once",
    ):
        pool.release(lease)
    newer = pool.acquire((8,), F32, "cpu")
    assert newer.buffer_id == lease.buffer_id
    with pytest.raises(ValueError, match="already released"):
        lease.release()
    assert not newer.released and pool.stats()["in_use_bytes"] == 512


def test_foreign_and_unknown_leases_are_refused(make_pool) -> None:
    pool, other = make_pool(), make_pool()
    foreign = other.acquire((8,), F32, "cpu")
    with pytest.raises(
        ValueError, match=rf"release: the lease of buffer {foreign.buffer_id} was issued by another pool"
    ):
        pool.release(foreign)
    with pytest.raises(TypeError, match=r"release: lease=42 must be a Lease \(got int\)"):
        pool.release(42)
    evicting = make_pool(budget_bytes=0)
    lease = evicting.acquire((8,), F32, "cpu")
    lease.release()
    assert evicting.stats()["num_buffers"] == 0
    with pytest.raises(ValueError, match=rf"unpin: buffer {lease.buffer_id} is not held by this pool"):
        evicting.unpin(lease)


def test_budget_evicts_least_recently_freed_after_every_release(make_pool) -> None:
    pool = make_pool(budget_bytes=1024)
    leases = [pool.acquire((128,), F32, "cpu") for _ in range(4)]  # 512 bytes each
    order = [2, 0, 3, 1]
    for i in order:
        leases[i].release()
        assert pool.stats()["free_bytes"] <= 1024
    stats = pool.stats()
    assert (stats["evictions"], stats["num_buffers"], stats["reserved_bytes"]) == (2, 2, 1024)
    evicted = [e.buffer_id for e in pool.events() if e.kind == "evict"]
    assert evicted == [leases[2].buffer_id, leases[0].buffer_id]
    assert pool.acquire((128,), F32, "cpu").buffer_id == leases[1].buffer_id
    assert stats["peak_reserved_bytes"] == stats["peak_in_use_bytes"] == 2048


def test_budget_zero_keeps_nothing(make_pool) -> None:
    pool = make_pool(budget_bytes=0)
    for _ in range(3):
        pool.acquire((128,), F32, "cpu").release()
    stats = pool.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"], stats["reserved_bytes"]) == (0, 3, 3, 0)


def test_trim_evicts_to_the_target_and_reports_bytes(make_pool) -> None:
    pool = make_pool()
    leases = [pool.acquire((n,), F32, "cpu") for n in (128, 256, 512)]  # 512, 1024, 2048 bytes
    held = pool.acquire((128,), F32, "cpu")
    for lease in leases:
        lease.release()
    assert pool.trim(3072) == 512  # 3584 free: the oldest (512) alone gets under 3072
    assert pool.trim(2048) == 1024
    assert pool.trim() == 2048
    assert pool.trim() == 0
    stats = pool.stats()
    assert (stats["reserved_bytes"], stats["in_use_bytes"], stats["evictions"]) == (512, 512, 3)
    held.release()
    with pytest.raises(ValueError, match=r"target_bytes=-1 must be >= 0"):
        pool.trim(-1)


def test_pinned_buffer_is_neither_reused_nor_evicted(make_pool) -> None:
    pool = make_pool(budget_bytes=4096)
    lease = pool.acquire((128,), F32, "cpu")
    pool.pin(lease)
    pool.pin(lease)
    lease.release()
    stats = pool.stats()
    assert (stats["pinned_bytes"], stats["free_bytes"], stats["in_use_bytes"]) == (512, 0, 0)
    assert pool.acquire((128,), F32, "cpu").buffer_id != lease.buffer_id
    assert pool.trim() == 0
    pool.unpin(lease)
    assert pool.stats()["pinned_bytes"] == 512
    pool.unpin(lease)
    stats = pool.stats()
    assert (stats["pinned_bytes"], stats["free_bytes"], stats["num_free"]) == (0, 512, 1)
    with pytest.raises(
        ValueError, match=rf"unpin: buffer {lease.buffer_id} is not pinned; unpin once per pin"
    ):
        pool.unpin(lease)
    with pytest.raises(ValueError, match=rf"pin: the lease of buffer {lease.buffer_id} was already released"):
        pool.pin(lease)
    newer = pool.acquire((128,), F32, "cpu")
    assert newer.buffer_id == lease.buffer_id
    pool.pin(newer)
    with pytest.raises(ValueError, match=rf"unpin: the lease of buffer {lease.buffer_id} is stale"):
        pool.unpin(lease)
    pool.unpin(newer)
    newer.release()


def test_pinning_past_the_budget_raises_a_typed_error(make_pool) -> None:
    pool = make_pool(budget_bytes=1024)
    a, b, c = (pool.acquire((128,), F32, "cpu") for _ in range(3))
    spare = pool.acquire((128,), F32, "cpu")
    spare.release()
    pool.pin(a)
    pool.pin(b)
    with pytest.raises(PoolBudgetError) as caught:
        pool.pin(c)
    err = caught.value
    assert isinstance(err, ValueError)
    assert (err.requested_bytes, err.free_bytes, err.pinned_bytes, err.budget_bytes) == (512, 512, 1024, 1024)
    assert f"buffer {c.buffer_id}" in str(err) and "over budget_bytes=1024" in str(err)
    pool.pin(a)  # a further pin of a pinned buffer adds nothing to the pinned set
    c.release()
    assert pool.stats()["pinned_bytes"] == 1024 and pool.stats()["free_bytes"] <= 1024


def test_failed_allocation_leaves_no_trace(make_pool, monkeypatch) -> None:
    pool = make_pool()
    pool.acquire((128,), F32, "cpu").release()

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError("simulated allocation failure")

    monkeypatch.setattr(pool_module.torch, "UntypedStorage", out_of_memory)
    with pytest.raises(MemoryError):
        pool.acquire((4096,), F32, "cpu")
    monkeypatch.undo()
    stats = pool.stats()
    assert (stats["reserved_bytes"], stats["in_use_bytes"], stats["requested_bytes"]) == (512, 0, 0)
    assert (stats["num_buffers"], stats["misses"]) == (1, 2)
    assert [e.kind for e in pool.events()][-1] == "abandon"
    assert pool.acquire((4096,), F32, "cpu").tensor.shape == (4096,)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda p: p.acquire((2, -1), F32, "cpu"), ValueError, r"shape\[1\]=-1 must be >= 0"),
        (lambda p: p.acquire((2, 1.5), F32, "cpu"), TypeError, r"shape\[1\]=1.5 must be an int"),
        (lambda p: p.acquire("2", F32, "cpu"), TypeError, r"shape='2' must be a sequence"),
        (lambda p: p.acquire((2,), "float32", "cpu"), TypeError, r"dtype='float32' must be a torch.dtype"),
        (lambda p: p.acquire((2,), F32, "nowhere"), TypeError, r"device='nowhere' is not a torch device"),
        (
            lambda p: p.acquire((1 << 40, 1 << 40), F32, "cpu"),
            ValueError,
            r"a request must be under 2\*\*62 bytes",
        ),
        (lambda p: p.trim(1.0), TypeError, r"target_bytes=1.0 must be an int"),
    ],
)
def test_bad_arguments_are_named(make_pool, call, error, message) -> None:
    pool = make_pool()
    with pytest.raises(error, match=message):
        call(pool)
    assert pool.stats()["misses"] == 0


@pytest.mark.parametrize(
    ("budget", "error", "message"),
    [
        (-1, ValueError, r"budget_bytes=-1 must be >= 0"),
        (True, TypeError, r"budget_bytes=True must be an int or None"),
    ],
)
def test_bad_budgets_are_named(make_pool, budget, error, message) -> None:
    with pytest.raises(error, match=message):
        make_pool(budget_bytes=budget)


def test_both_pools_report_the_same_stats_keys(rust_pool_class) -> None:
    python_pool, rust_pool = PythonBufferPool(), rust_pool_class()
    assert list(python_pool.stats()) == list(rust_pool.stats()) == list(STATS_KEYS)
