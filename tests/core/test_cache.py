"""The metadata cache: one LRU and byte budget over named regions, on both cache ledgers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from dilated_attn import cache as cache_module
from dilated_attn.__main__ import main
from dilated_attn.cache import MetadataCache, cache_stats, metadata_cache, set_cache_budget
from dilated_attn.pool.cache_ledger import CACHE_STATS_KEYS, PythonCacheLedger


def _ledger(kind: str) -> Callable[[int], Any]:
    if kind == "rust":
        return pytest.importorskip("dilated_attn_pool._pool_rs").CacheLedger
    return PythonCacheLedger


@pytest.fixture(params=["python", "rust"])
def make_cache(request: pytest.FixtureRequest) -> Callable[[int], MetadataCache]:
    ledger = _ledger(request.param)
    return lambda budget: MetadataCache(budget, ledger=ledger)


# Each scenario: steps of (region, key, nbytes) gets, then the expected per-region stats and the
# keys left in each region. Budget 100 throughout.
SCENARIOS = {
    "hits_then_lru_eviction": (
        [("a", 1, 40), ("a", 2, 40), ("a", 1, 40), ("b", 3, 40)],
        {
            "a": {"hits": 1, "misses": 2, "evictions": 1, "oversize": 0, "entries": 1, "bytes": 40},
            "b": {"hits": 0, "misses": 1, "evictions": 0, "oversize": 0, "entries": 1, "bytes": 40},
        },
        {"a": {1}, "b": {3}},
    ),
    "oversize_is_built_not_kept": (
        [("a", 1, 60), ("a", 2, 101), ("a", 2, 101), ("a", 1, 60)],
        {"a": {"hits": 1, "misses": 3, "evictions": 0, "oversize": 2, "entries": 1, "bytes": 60}},
        {"a": {1}},
    ),
    "exact_fit_and_zero_sized": (
        [("a", 1, 100), ("b", 2, 0), ("a", 1, 100), ("b", 3, 1)],
        {
            "a": {"hits": 1, "misses": 1, "evictions": 1, "oversize": 0, "entries": 0, "bytes": 0},
            # Strict LRU order: the zero-sized entry goes first, then the 100-byte one.
            "b": {"hits": 0, "misses": 2, "evictions": 1, "oversize": 0, "entries": 1, "bytes": 1},
        },
        {"a": set(), "b": {3}},
    ),
    "one_lru_across_regions": (
        [("a", 1, 30), ("b", 1, 30), ("c", 1, 30), ("a", 1, 30), ("b", 2, 30)],
        {
            "a": {"hits": 1, "misses": 1, "evictions": 0, "oversize": 0, "entries": 1, "bytes": 30},
            "b": {"hits": 0, "misses": 2, "evictions": 1, "oversize": 0, "entries": 1, "bytes": 30},
            "c": {"hits": 0, "misses": 1, "evictions": 0, "oversize": 0, "entries": 1, "bytes": 30},
        },
        {"a": {1}, "b": {2}, "c": {1}},
    ),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_scenarios(make_cache, scenario) -> None:
    steps, expected, keys = SCENARIOS[scenario]
    cache = make_cache(100)
    builds: list[tuple[str, Any]] = []
    for region, key, nbytes in steps:

        def build(region: str = region, key: Any = key) -> tuple[str, Any]:
            builds.append((region, key))
            return (region, key)

        assert cache.region(region).get_or_build(key, build, nbytes=nbytes) == (region, key)
    stats = cache.stats()
    assert stats["regions"] == expected
    assert {name: set(cache.region(name)._ids) for name in expected} == keys
    assert len(builds) == sum(r["misses"] for r in expected.values())
    total = stats["total"]
    ledger = dict(zip(CACHE_STATS_KEYS, cache._ledger.stats()))
    assert (total["entries"], total["bytes"], total["evictions"], total["oversize"]) == (
        ledger["entries"],
        ledger["bytes"],
        ledger["evictions"],
        ledger["oversize"],
    )
    assert total["bytes"] <= 100


def test_many_distinct_plans_stay_within_the_budget(make_cache) -> None:
    budget = 64 << 10
    cache = make_cache(budget)
    plans = cache.region("core.gather_plans")
    for n in range(2000):
        plan = plans.get_or_build(
            ("plan", n), lambda n=n: torch.arange(n % 97 + 1, dtype=torch.int64), nbytes=lambda t: t.nbytes
        )
        assert plan.shape == (n % 97 + 1,)
        assert cache.stats()["total"]["bytes"] <= budget
    stats = plans.stats()
    assert stats["misses"] == 2000 and stats["evictions"] > 1000
    assert stats["entries"] + stats["evictions"] == 2000
    assert stats["bytes"] == sum(cache._entries[i].nbytes for i in plans._ids.values()) <= budget
    # The most recent plan is still cached: a hit returns the stored tensor itself.
    last = plans.get_or_build(("plan", 1999), lambda: pytest.fail("rebuilt"), nbytes=0)
    assert plans.stats()["hits"] == 1 and last.shape == (1999 % 97 + 1,)


def test_set_budget_evicts_at_once_and_clear_forgets(make_cache) -> None:
    cache = make_cache(1000)
    region = cache.region("r")
    for key in range(10):
        region.get_or_build(key, lambda: object(), nbytes=100)
    cache.set_budget(250)
    assert region.stats()["entries"] == 2 and region.stats()["evictions"] == 8
    assert set(region._ids) == {8, 9}
    region.clear()
    assert (region.stats()["entries"], region.stats()["bytes"], len(region)) == (0, 0, 0)
    assert cache._ledger.order() == []


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda r: r.get_or_build([1], lambda: 1, nbytes=1), TypeError, r"key=\[1\] must be hashable"),
        (lambda r: r.get_or_build(1, lambda: 1, nbytes=-1), ValueError, r"nbytes=-1 must be >= 0"),
        (lambda r: r.get_or_build(1, lambda: 1, nbytes=1.5), TypeError, r"nbytes=1\.5 must be an int"),
        (lambda r: r.get_or_build(1, lambda: 1, nbytes=lambda v: 2**70), OverflowError, r"nbytes=\d+"),
        (lambda r: r._cache.set_budget(-1), ValueError, r"set_cache_budget: budget_bytes=-1 must be >= 0"),
        (lambda r: r._cache.set_budget(2**62), ValueError, r"budget_bytes=\d+ must be < 2\*\*62"),
        (lambda r: r._cache.region(""), ValueError, r"name='' must be a non-empty string"),
    ],
)
def test_bad_arguments_are_named(make_cache, call, error, message) -> None:
    cache = make_cache(100)
    with pytest.raises(error, match=message):
        call(cache.region("r"))
    assert cache.stats()["total"]["entries"] == 0


def test_threads_share_one_budget(make_cache) -> None:
    budget = 10_000
    cache = make_cache(budget)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            region = cache.region(f"r{t % 3}")
            for i in range(1500):
                key = (i * 7 + t) % 120
                value = region.get_or_build(key, lambda key=key: ("v", key), nbytes=50 + key)
                assert value == ("v", key)
        except BaseException as exc:  # reported below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stats = cache.stats()
    total = stats["total"]
    assert total["bytes"] <= budget
    assert total["hits"] + total["misses"] == 6 * 1500
    ledger = dict(zip(CACHE_STATS_KEYS, cache._ledger.stats()))
    assert (total["entries"], total["bytes"]) == (ledger["entries"], ledger["bytes"])
    assert sorted(cache._entries) == sorted(cache._ledger.order())


def test_the_process_cache_reads_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("DILATED_ATTN_CACHE_BYTES", "12_345")
    assert MetadataCache().budget_bytes == 12345
    # Read at the budget's first use (regions are taken at import), so a bad value fails there.
    monkeypatch.setenv("DILATED_ATTN_CACHE_BYTES", "lots")
    cache = MetadataCache()
    cache.region("test.lazy")
    with pytest.raises(ValueError, match=r"DILATED_ATTN_CACHE_BYTES='lots' must be a whole number"):
        cache.region("test.lazy").get_or_build("k", lambda: 1)
    monkeypatch.setenv("DILATED_ATTN_CACHE_BYTES", "-5")
    with pytest.raises(ValueError, match=r"DILATED_ATTN_CACHE_BYTES: budget_bytes=-5 must be >= 0"):
        _ = MetadataCache().budget_bytes


def test_process_cache_api_and_cli(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cache_module, "_cache", MetadataCache(1 << 20))
    region = metadata_cache("test.cli")
    assert metadata_cache("test.cli") is region
    region.get_or_build("k", lambda: "v", nbytes=10)
    region.get_or_build("k", lambda: "other", nbytes=10)
    set_cache_budget(1 << 19)
    stats = cache_stats()
    assert stats["budget_bytes"] == 1 << 19
    assert stats["regions"]["test.cli"] == {
        "hits": 1,
        "misses": 1,
        "evictions": 0,
        "oversize": 0,
        "entries": 1,
        "bytes": 10,
    }
    expected_ledger = "rust" if _has_rust() else "python"
    assert stats["ledger"] == expected_ledger
    assert main(["cache", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["regions"]["test.cli"]["hits"] == 1
    assert main(["cache"]) == 0
    table = capsys.readouterr().out
    assert "test.cli" in table and f"ledger={expected_ledger}" in table and "budget_bytes=524288" in table


def test_cli_reports_a_bad_budget_in_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cache_module, "_cache", None)
    monkeypatch.setenv("DILATED_ATTN_CACHE_BYTES", "64MB")
    assert main(["cache"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DILATED_ATTN_CACHE_BYTES='64MB' must be a whole number" in err


def _has_rust() -> bool:
    try:
        import dilated_attn_pool  # noqa: F401
    except ImportError:
        return False
    return True


def test_compile_sees_no_lock_and_no_bookkeeping(monkeypatch) -> None:
    """Under torch.compile(fullgraph=True) a cached lookup is just build(); eager caches it."""
    monkeypatch.setattr(cache_module, "_cache", MetadataCache(1 << 20, ledger=PythonCacheLedger))
    region = metadata_cache("test.compile")

    def scaled(x: torch.Tensor) -> torch.Tensor:
        factor = region.get_or_build(("factor", x.shape[-1]), lambda: float(x.shape[-1]), nbytes=8)
        return x * factor

    x = torch.randn(3, 5)
    compiled = torch.compile(scaled, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), scaled(x), rtol=0, atol=0)
    stats = region.stats()
    assert (stats["misses"], stats["hits"]) == (1, 0)


@pytest.mark.parametrize("argv", [["nope"], [], ["cache", "--bogus"]])
def test_module_cli_errors_are_one_line(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m dilated_attn: error: "), lines


def test_a_bad_budget_fails_the_call_not_the_plugins(tmp_path) -> None:
    # Modules take their cache regions at import: a bad DILATED_ATTN_CACHE_BYTES must not make the
    # plugins' imports fail (they would be skipped with a warning about something else), but the
    # first call that uses the cache, naming the variable; set_cache_budget still overrides it.
    code = textwrap.dedent(
        """
        import warnings, torch
        warnings.simplefilter("error")
        from dilated_attn import dilated_attention
        from dilated_attn.cache import set_cache_budget
        from dilated_attn.registry import get_registry
        registry = get_registry()
        assert not registry.failures(), registry.failures()
        q = torch.randn(1, 8, 2, 4)
        try:
            dilated_attention(q, q, q, [4], [1])
        except ValueError as exc:
            assert "DILATED_ATTN_CACHE_BYTES='64MB' must be a whole number" in str(exc), exc
        else:
            raise AssertionError("a bad budget was accepted")
        set_cache_budget(1 << 20)
        dilated_attention(q, q, q, [4], [1])
        print("OK")
        """
    )
    env = dict(os.environ, DILATED_ATTN_CACHE_BYTES="64MB")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr
