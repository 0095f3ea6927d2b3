"""No argument aborts, panics or wraps a ledger: every bad integer on every method of both ledgers
(buffer pool and cache) raises the same Python exception with the same message, and changes nothing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from dilated_attn.pool import MAX_REQUEST_BYTES, MAX_RESERVED_BYTES, PythonLedger
from dilated_attn.pool.cache_ledger import PythonCacheLedger
from dilated_attn.pool.protocol import Lease
from dilated_attn.pool.storage import LedgerPool

HUGE = (2**62, 2**63, 2**64, 2**70, 2**200)


def _ledger_classes(kind: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    if kind == "rust":
        pool_rs = pytest.importorskip("dilated_attn_pool._pool_rs")
        return pool_rs.Ledger, pool_rs.CacheLedger
    return PythonLedger, PythonCacheLedger


def _cases() -> list[tuple[str, tuple[Any, ...], type[BaseException], str]]:
    """(method, args, exception, message pattern); ``L`` stands for a held lease's id and serial."""
    cases: list[tuple[str, tuple[Any, ...], type[BaseException], str]] = []
    for value in (-1, -(2**70)):
        cases += [
            ("new", (None, value), ValueError, rf"event_capacity={value} must be >= 0"),
            ("new", (value,), ValueError, rf"budget_bytes={value} must be >= 0 and < 2\*\*62"),
            ("acquire", (value, 0, 1), ValueError, rf"acquire: device={value} must be >= 0"),
            ("acquire", (0, value, 1), ValueError, rf"acquire: dtype={value} must be >= 0"),
            ("acquire", (0, 0, value), ValueError, rf"acquire: nbytes={value} must be >= 0"),
            ("trim", (value,), ValueError, rf"trim: target_bytes={value} must be >= 0"),
        ]
        for op in ("release", "pin", "unpin", "abandon"):
            cases.append((op, (value, 0), ValueError, rf"{op}: buffer_id={value} must be >= 0"))
            cases.append((op, ("L", value), ValueError, rf"{op}: serial={value} must be >= 0"))
    for value in HUGE:
        cases += [
            ("new", (None, value), ValueError if value < 2**64 else OverflowError, "event_capacity="),
            ("new", (value,), ValueError, rf"budget_bytes={value} must be >= 0 and < 2\*\*62"),
            ("acquire", (value, 0, 1), OverflowError, r"device=\d+ does not fit an unsigned 32-bit"),
            ("acquire", (0, value, 1), OverflowError, r"dtype=\d+ does not fit an unsigned 32-bit"),
        ]
        if value < 2**64:
            cases.append(("acquire", (0, 0, value), ValueError, r"a request must be under 2\*\*62 bytes"))
        else:
            cases.append(("acquire", (0, 0, value), OverflowError, r"nbytes=\d+ does not fit .* 64-bit"))
            cases.append(("trim", (value,), OverflowError, r"target_bytes=\d+ does not fit"))
            for op in ("release", "pin", "unpin", "abandon"):
                cases.append((op, (value, 0), OverflowError, rf"{op}: buffer_id=\d+ does not fit"))
                cases.append((op, ("L", value), OverflowError, rf"{op}: serial=\d+ does not fit"))
    for not_int in (1.5, "3", None, True):
        pattern = rf"={not_int!r} must be an int".replace("(", r"\(").replace(".", r"\.")
        cases += [
            ("acquire", (0, 0, not_int), TypeError, pattern),
            ("acquire", (not_int, 0, 1), TypeError, pattern),
            ("trim", (not_int,), TypeError, pattern),
            ("release", ("L", not_int), TypeError, pattern),
        ]
    cases.append(("new", (None, 2**20 + 1), ValueError, r"event_capacity=1048577 must be <= 1048576"))
    return cases


CASES = _cases()


@pytest.mark.parametrize("kind", ["python", "rust"])
@pytest.mark.parametrize(("method", "args", "error", "message"), CASES)
def test_pool_ledger_refuses_bad_integers(kind, method, args, error, message) -> None:
    ledger_class, _ = _ledger_classes(kind)
    if method == "new":
        with pytest.raises(error, match=message):
            ledger_class(*args)
        return
    ledger = ledger_class(1024, 16)
    held = ledger.acquire(0, 0, 100)[:2]
    before = (list(ledger.stats()), list(ledger.events()))
    call_args = tuple(held[0] if a == "L" else a for a in args)
    with pytest.raises(error, match=message):
        getattr(ledger, method)(*call_args)
    assert (list(ledger.stats()), list(ledger.events())) == before


@pytest.mark.parametrize("kind", ["python", "rust"])
@pytest.mark.parametrize(
    ("method", "args", "error", "message"),
    [
        ("new", (-1,), ValueError, r"CacheLedger: budget_bytes=-1 must be >= 0"),
        ("new", (2**62,), ValueError, r"CacheLedger: budget_bytes=4611686018427387904 must be < 2\*\*62"),
        ("new", (2**64,), OverflowError, r"CacheLedger: budget_bytes=\d+ does not fit"),
        ("new", (None,), TypeError, r"CacheLedger: budget_bytes=None must be an int"),
        ("insert", (-3, 1), ValueError, r"insert: entry_id=-3 must be >= 0"),
        ("insert", (2**64, 1), OverflowError, r"insert: entry_id=\d+ does not fit"),
        ("insert", (1, -1), ValueError, r"insert: nbytes=-1 must be >= 0"),
        ("insert", (1, 2**70), OverflowError, r"insert: nbytes=\d+ does not fit"),
        ("insert", (1, 1.0), TypeError, r"insert: nbytes=1\.0 must be an int \(got float\)"),
        ("insert", (0, 1), ValueError, r"insert: entry 0 is already held"),
        ("touch", (-1,), ValueError, r"touch: entry_id=-1 must be >= 0"),
        ("touch", (2**80,), OverflowError, r"touch: entry_id=\d+ does not fit"),
        ("touch", (5,), ValueError, r"touch: entry 5 is not held"),
        ("remove", (True,), TypeError, r"remove: entry_id=True must be an int \(got bool\)"),
        ("remove", (5,), ValueError, r"remove: entry 5 is not held"),
        ("set_budget", (-1,), ValueError, r"set_budget: budget_bytes=-1 must be >= 0"),
        ("set_budget", (2**63,), ValueError, r"set_budget: budget_bytes=\d+ must be < 2\*\*62"),
        ("set_budget", (2**65,), OverflowError, r"set_budget: budget_bytes=\d+ does not fit"),
    ],
)
def test_cache_ledger_refuses_bad_integers(kind, method, args, error, message) -> None:
    _, cache_class = _ledger_classes(kind)
    if method == "new":
        with pytest.raises(error, match=message):
            cache_class(*args)
        return
    ledger = cache_class(1000)
    ledger.insert(0, 10)
    before = (list(ledger.stats()), ledger.order())
    with pytest.raises(error, match=message):
        getattr(ledger, method)(*args)
    assert (list(ledger.stats()), ledger.order()) == before


@pytest.mark.parametrize("kind", ["python", "rust"])
def test_reserved_bytes_stop_at_the_limit_on_meta(kind) -> None:
    """Five near-2**62 buffers on the meta device (which allocates nothing): the third miss is
    refused with MemoryError and no counter wraps; both ledgers report the same numbers."""
    ledger_class, _ = _ledger_classes(kind)
    pool = LedgerPool(ledger_class(None, 64))
    leases: list[Lease] = []
    refused = 0
    for _ in range(5):
        try:
            leases.append(pool.acquire((MAX_REQUEST_BYTES - 1,), torch.uint8, "meta"))
        except MemoryError as exc:
            assert "over the ledger's limit of 2**63" in str(exc)
            refused += 1
    stats = pool.stats()
    assert (len(leases), refused) == (2, 3)
    assert (
        stats["reserved_bytes"] == stats["in_use_bytes"] == stats["peak_reserved_bytes"] == MAX_RESERVED_BYTES
    )
    assert stats["misses"] == 2 and stats["requested_bytes"] == 2 * (MAX_REQUEST_BYTES - 1)
    for lease in leases:
        lease.release()
    assert pool.stats()["free_bytes"] == MAX_RESERVED_BYTES


@pytest.mark.parametrize("kind", ["python", "rust"])
@pytest.mark.parametrize("nbytes", [1 << 61, (1 << 62) - 1, 3 << 59])
def test_a_failed_huge_allocation_rolls_the_ledger_back(kind, nbytes) -> None:
    """torch cannot allocate these on the CPU: the miss is abandoned and the peaks are what they
    were, not 2.3e18."""
    ledger_class, _ = _ledger_classes(kind)
    pool = LedgerPool(ledger_class(None, 64))
    kept = pool.acquire((1000,), torch.uint8, "cpu")
    before = pool.stats()
    with pytest.raises((RuntimeError, MemoryError)):
        pool.acquire((nbytes,), torch.uint8, "cpu")
    after = pool.stats()
    assert (after["peak_reserved_bytes"], after["peak_in_use_bytes"]) == (1024, 1024)
    assert {k: v for k, v in after.items() if k != "misses"} == {
        k: v for k, v in before.items() if k != "misses"
    }
    assert after["misses"] == before["misses"] + 1
    assert [e.kind for e in pool.events()][-1] == "abandon"
    kept.release()
