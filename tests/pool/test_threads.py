"""8 threads hammering one pool: no buffer is ever held by two holders, and the books balance.

Each thread holds up to 4 leases of random sizes, pins some, and checks before every release that
nobody wrote into its buffer (a stamp it wrote over the whole tensor is intact). A shared set of
held buffer ids catches a double hand-out directly; an id leaves the set *before* its release, so a
hand-out right after the release is not mistaken for a collision.
"""

from __future__ import annotations

import random
import threading
import time

import torch
from dilated_attn.pool import Lease, PoolBudgetError

THREADS = 8
OPS_PER_THREAD = 20_000
SIZES = [1, 16, 100, 128, 200, 256, 1000, 2048]


def test_threads_never_share_a_buffer(make_pool) -> None:
    pool = make_pool(budget_bytes=24 * 1024)
    held_ids: set[int] = set()
    held_lock = threading.Lock()
    failures: list[BaseException] = []
    acquired = [0] * THREADS

    def worker(index: int) -> None:
        rng = random.Random(index)
        stamp = float(index + 1)
        mine: list[tuple[Lease, bool]] = []

        def give_back(lease: Lease, pinned: bool) -> None:
            assert torch.all(lease.tensor == stamp), f"buffer {lease.buffer_id} was written by another holder"
            with held_lock:
                held_ids.remove(lease.buffer_id)
            lease.release()
            if pinned:
                pool.unpin(lease)

        try:
            for _ in range(OPS_PER_THREAD):
                if len(mine) < 4 and (not mine or rng.random() < 0.55):
                    lease = pool.acquire((rng.choice(SIZES),), torch.float32, "cpu")
                    with held_lock:
                        assert lease.buffer_id not in held_ids, f"buffer {lease.buffer_id} handed out twice"
                        held_ids.add(lease.buffer_id)
                    acquired[index] += 1
                    lease.tensor.fill_(stamp)
                    pinned = False
                    if rng.random() < 0.05:
                        try:
                            pool.pin(lease)
                            pinned = True
                        except PoolBudgetError:
                            pass
                    mine.append((lease, pinned))
                else:
                    give_back(*mine.pop(rng.randrange(len(mine))))
            while mine:
                give_back(*mine.pop())
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    assert not failures, failures[0]
    stats = pool.stats()
    assert stats["hits"] + stats["misses"] == sum(acquired)
    assert stats["in_use_bytes"] == stats["requested_bytes"] == stats["pinned_bytes"] == 0
    assert stats["reserved_bytes"] == stats["free_bytes"] <= 24 * 1024
    assert stats["evictions"] > 0 and stats["hits"] > stats["misses"]
    assert elapsed < 30, f"{THREADS} x {OPS_PER_THREAD} operations took {elapsed:.1f} s"
