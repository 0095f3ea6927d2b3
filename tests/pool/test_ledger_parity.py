"""The Rust ledger and the Python ledger, fed the same random operations, agree on everything:
every grant, every evicted id, every refusal's type and message, every stat, the event history."""

from __future__ import annotations

from typing import Any

import pytest
from dilated_attn.pool import MAX_REQUEST_BYTES, STATS_KEYS, PythonLedger
from hypothesis import given, settings
from hypothesis import strategies as st

pool_rs = pytest.importorskip("dilated_attn_pool._pool_rs")

NBYTES = st.one_of(
    st.integers(0, 2048),
    # Two requests of MAX_REQUEST_BYTES - 1 reach the reserved-bytes limit: a third miss is refused.
    st.sampled_from(
        [1 << 20, (1 << 20) + 1, 3 << 20, (5 << 20) + 1, MAX_REQUEST_BYTES - 1, MAX_REQUEST_BYTES]
    ),
)
OPS = st.one_of(
    st.tuples(st.just("acquire"), st.integers(0, 1), st.integers(0, 1), NBYTES),
    st.tuples(st.sampled_from(["release", "pin", "unpin", "abandon"]), st.integers(0, 1000)),
    st.tuples(st.just("trim"), st.integers(0, 4096)),
    st.tuples(st.just("release_unknown"), st.integers(1000, 1010)),
)
BUDGETS = st.one_of(st.none(), st.integers(0, 6144), st.integers(0, 12).map(lambda k: k * 512))


def outcome(ledger: Any, op: tuple[Any, ...], lease: tuple[int, int] | None) -> tuple[Any, ...]:
    """Run ``op`` on ``ledger``: ``("ok", result)`` with lists made comparable, or the refusal."""
    name = op[0]
    try:
        if name == "acquire":
            result = ledger.acquire(*op[1:])
        elif name == "trim":
            result = ledger.trim(op[1])
        elif name == "release_unknown":
            result = ledger.release(op[1], 0)
        else:
            result = getattr(ledger, name)(*lease)
    except (ValueError, MemoryError) as exc:
        return ("refused", type(exc), str(exc))
    if isinstance(result, (tuple, list)):
        return ("ok", tuple(list(r) if isinstance(r, list) else r for r in result))
    return ("ok", result)


@settings(max_examples=300, deadline=None)
@given(budget=BUDGETS, ops=st.lists(OPS, min_size=1, max_size=120))
def test_rust_ledger_matches_python_ledger(budget: int | None, ops: list[tuple[Any, ...]]) -> None:
    ledgers = [PythonLedger(budget, 4096), pool_rs.Ledger(budget, 4096)]
    leases: list[tuple[int, int]] = []
    for op in ops:
        lease = None
        if op[0] in ("release", "pin", "unpin", "abandon"):
            if not leases:
                continue
            lease = leases[op[1] % len(leases)]
        results = [outcome(ledger, op, lease) for ledger in ledgers]
        if op[0] == "acquire" and results[0][0] == "ok":
            leases.append(results[0][1][:2])
        assert results[0] == results[1], op
        python_stats, rust_stats = (list(ledger.stats()) for ledger in ledgers)
        assert python_stats == rust_stats, dict(zip(STATS_KEYS, zip(python_stats, rust_stats)))
    assert [tuple(e) for e in ledgers[0].events()] == [tuple(e) for e in ledgers[1].events()]


def test_event_ring_keeps_the_newest() -> None:
    ledgers = [PythonLedger(None, 3), pool_rs.Ledger(None, 3)]
    for ledger in ledgers:
        for _ in range(4):
            buffer_id, serial, _ = ledger.acquire(0, 0, 100)
            ledger.release(buffer_id, serial)
    assert ledgers[0].events() == [tuple(e) for e in ledgers[1].events()]
    # alloc, release, then (reuse, release) x 3: the ring of 3 holds release, reuse, release.
    assert [kind for kind, *_ in ledgers[0].events()] == [2, 1, 2]
