"""The dilated-attn-pool distribution: version handshake, plugin registration, typing files."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pluggy
import pytest
from dilated_attn import backends, hookspecs
from dilated_attn.pool import STATS_KEYS
from dilated_attn.registry import Registry

dilated_attn_pool = pytest.importorskip("dilated_attn_pool")

from dilated_attn_pool import _pool_rs, plugin  # noqa: E402
from dilated_attn_pool._shared import check_shared  # noqa: E402
from dilated_attn_pool._version import check_compiled  # noqa: E402


def test_compiled_module_matches_the_python_package() -> None:
    assert _pool_rs.__version__ == dilated_attn_pool.__version__
    assert list(_pool_rs.STATS_KEYS) == list(STATS_KEYS)


def test_installed_distribution_version_matches() -> None:
    try:
        installed = importlib.metadata.version("dilated-attn-pool")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("dilated-attn-pool is importable but not installed as a distribution")
    assert installed == dilated_attn_pool.__version__


def test_mismatched_binary_raises_import_error_naming_both_versions() -> None:
    with pytest.raises(
        ImportError, match=r"dilated_attn_pool 0\.1\.0 .* of version 9\.9\.9; they must match\. Rebuild"
    ):
        check_compiled("9.9.9", "0.1.0")
    check_compiled("0.1.0", "0.1.0")


def _registry_with_pool_plugin() -> Registry:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(backends, name="core")
    pm.register(plugin, name="pool")
    pm.check_pending()
    return Registry(pm, {})


def test_plugin_registers_rust_preferred_over_python() -> None:
    registry = _registry_with_pool_plugin()
    rust = registry.pool("rust")
    assert rust.factory is dilated_attn_pool.RustBufferPool
    pools = registry.pools()
    preferred = max(pools.values(), key=lambda p: p.capabilities.get("priority", 0))
    assert preferred.name == "rust"
    assert pools["rust"].capabilities["priority"] > pools["python"].capabilities.get("priority", 0)
    assert rust.factory(budget_bytes=1024).budget_bytes == 1024


def test_entry_point_names_the_plugin_module() -> None:
    try:
        dist = importlib.metadata.distribution("dilated-attn-pool")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("dilated-attn-pool is importable but not installed as a distribution")
    points = [ep for ep in dist.entry_points if ep.group == "dilated_attn"]
    assert [(ep.name, ep.value) for ep in points] == [("pool", "dilated_attn_pool.plugin")]
    assert points[0].load() is plugin


def test_typing_files_ship_with_the_package() -> None:
    package = Path(dilated_attn_pool.__file__).parent
    assert (package / "py.typed").is_file()
    assert (package / "_pool_rs.pyi").is_file()


def test_compiled_module_shares_core_constants_and_refusal_texts() -> None:
    from dilated_attn.pool import ledger

    assert list(_pool_rs.EVENT_KINDS) == list(ledger.EVENT_KINDS)
    assert [tuple(s) for s in _pool_rs.REFUSAL_SAMPLES] == list(ledger.REFUSAL_SAMPLES)
    check_shared(_pool_rs, dilated_attn_pool.__version__)


@pytest.mark.parametrize(
    ("module", "name", "value"),
    [
        ("ledger", "STATS_KEYS", (*STATS_KEYS[:-1], "num_idle")),
        ("ledger", "EVENT_KINDS", ("alloc", "reuse", "release", "pin", "unpin", "evict", "drop")),
        ("ledger", "ROUNDUP_DIVISIONS", 8),
        ("ledger", "MAX_RESERVED_BYTES", 1 << 62),
        ("ledger", "REFUSAL_SAMPLES", (("release", "unknown", "release: no such buffer 7"),)),
        ("cache_ledger", "CACHE_STATS_KEYS", ("entries", "bytes")),
    ],
)
def test_a_drifted_constant_stops_the_import(monkeypatch, module, name, value) -> None:
    """Core changes one shared constant: importing dilated_attn_pool raises ImportError naming it."""
    import importlib

    import dilated_attn.pool

    monkeypatch.setattr(getattr(dilated_attn.pool, module), name, value)
    with pytest.raises(ImportError, match=rf"disagrees with dilated-attn-core on {name} \({name}: compiled"):
        check_shared(_pool_rs, "0.1.0")
    try:
        with pytest.raises(ImportError, match=rf"on {name} .*same release, or rebuild"):
            importlib.reload(dilated_attn_pool)
    finally:
        monkeypatch.undo()
        importlib.reload(dilated_attn_pool)
    assert dilated_attn_pool.RustBufferPool.cache_ledger is _pool_rs.CacheLedger
