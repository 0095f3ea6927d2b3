"""Plugins: in-test registration, a throwaway installed distribution, auto selection, the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from dilated_attn import MultiheadDilatedAttention, dilated_attention, hookimpl
from dilated_attn.functional import build_request
from dilated_attn.registry import (
    build_registry,
    get_backend,
    get_registry,
    reset_registry,
)


def test_builtins_register_through_the_hook():
    registry = get_registry()
    assert {"reference", "sdpa"} <= set(registry.backends())
    assert registry.attention("sdpa").source.plugin == "core"
    assert "python" in registry.pools()


def test_unknown_backend_lists_known_names():
    with pytest.raises(
        ValueError,
        match=r"backend='missing' is not a registered attention backend; known backends: \[.*'sdpa'",
    ):
        get_backend("missing")


def _request(device="cpu", **kwargs):
    q = torch.randn(1, 16, 2, 8, device=device, requires_grad=True)
    return build_request(q, q, q, **kwargs)


def test_auto_picks_highest_priority_that_fits():
    registry = get_registry()
    chosen = registry.select(_request(causal=True))
    assert chosen.capabilities.priority >= registry.attention("sdpa").capabilities.priority
    with pytest.raises(ValueError, match="found no attention backend for device='meta'"):
        registry.select(_request(device="meta"))


class _Recorder:
    """An in-test plugin: scales the core result so that the test can see it ran."""

    calls = 0

    @hookimpl
    def dilated_attn_register_attention(self, register):
        def fn(q, k, v, pattern, request):
            _Recorder.calls += 1
            out, lse = get_backend("sdpa").fn(q, k, v, pattern, request)
            return out * request.options.get("factor", 2.0), lse

        register("recorder", fn, devices=("cpu",), dtypes=(torch.float32,), auto=False, options=("factor",))


def test_in_test_plugin_used_by_name_and_unregistered():
    registry = get_registry()
    name = registry.register(_Recorder(), name="recorder-plugin")
    try:
        q = torch.randn(1, 12, 2, 4)
        plain = dilated_attention(q, q, q, [4], [1], backend="sdpa")
        out = dilated_attention(q, q, q, [4], [1], backend="recorder", factor=3.0)
        torch.testing.assert_close(out, plain * 3.0)
        with pytest.raises(ValueError, match="cannot run these inputs: dtype"):
            dilated_attention(q.double(), q.double(), q.double(), [4], [1], backend="recorder")
    finally:
        registry.unregister(name)
    assert "recorder" not in registry.backends()


def test_concurrent_registration_keeps_every_plugin():
    import threading

    def plugin(i):
        class One:
            @hookimpl
            def dilated_attn_register_attention(self, register):
                register(f"concurrent-{i}", lambda *a, **k: None, devices=("cpu",), auto=False)

        return One()

    registry = get_registry()
    names, errors = [], []
    barrier = threading.Barrier(8)

    def add(i):
        barrier.wait()
        try:
            names.append(registry.register(plugin(i), name=f"concurrent-plugin-{i}"))
        except Exception as exc:  # collected: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        assert {f"concurrent-{i}" for i in range(8)} <= set(registry.backends())
    finally:
        for name in names:
            registry.unregister(name)
    assert not any(n.startswith("concurrent-") for n in registry.backends())


def test_duplicate_names_are_refused():
    class Dup:
        @hookimpl
        def dilated_attn_register_attention(self, register):
            register("sdpa", lambda *a, **k: None)

    registry = get_registry()
    with pytest.raises(ValueError, match="attention backend 'sdpa' .* is a built-in"):
        registry.register(Dup(), name="dup")
    assert not registry.plugin_manager.has_plugin("dup")


def test_misspelt_hook_fails_loudly():
    class Typo:
        @hookimpl
        def dilated_attn_register_atention(self, register):
            pass

    registry = get_registry()
    with pytest.raises(Exception, match="unknown hook"):
        registry.register(Typo(), name="typo")
    assert not registry.plugin_manager.has_plugin("typo")


PLUGIN_SOURCE = textwrap.dedent(
    '''
    from dilated_attn import hookimpl, get_backend

    @hookimpl
    def dilated_attn_register_attention(register):
        """Registers "throwaway": the core result negated."""
        def fn(q, k, v, pattern, request):
            out, lse = get_backend("sdpa").fn(q, k, v, pattern, request)
            return -out, lse
        register("throwaway", fn, devices=("cpu",), auto=False, extra={"note": "test plugin"})
    '''
)


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A distribution installed into a temporary site dir: module, dist-info and entry point."""
    (tmp_path / "throwaway_plugin.py").write_text(PLUGIN_SOURCE)
    info = tmp_path / "throwaway_plugin-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: throwaway-plugin\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[dilated_attn]\nthrowaway = throwaway_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DILATED_ATTN_LOAD_PLUGINS", raising=False)
    reset_registry()
    try:
        yield tmp_path
    finally:
        sys.modules.pop("throwaway_plugin", None)
        reset_registry()


def test_entry_point_plugin_from_functional_and_module(installed_plugin):
    backend = get_backend("throwaway")
    assert backend.source.distribution == "throwaway-plugin" and backend.source.version == "1.2.3"
    torch.manual_seed(0)
    q = torch.randn(1, 16, 2, 8)
    plain = dilated_attention(q, q, q, [8], [1], backend="sdpa")
    torch.testing.assert_close(dilated_attention(q, q, q, [8], [1], backend="throwaway"), -plain)
    mha = MultiheadDilatedAttention(16, 2, [8], [1], backend="throwaway")
    ref = MultiheadDilatedAttention(16, 2, [8], [1], backend="sdpa")
    ref.load_state_dict(mha.state_dict())
    x = torch.randn(1, 16, 16)
    assert not torch.allclose(mha(x)[0], ref(x)[0])
    out = mha(x)[0]
    out.sum().backward()


def test_allow_list_env_var(installed_plugin, monkeypatch):
    monkeypatch.setenv("DILATED_ATTN_LOAD_PLUGINS", "")
    assert "throwaway" not in build_registry().backends()
    monkeypatch.setenv("DILATED_ATTN_LOAD_PLUGINS", "throwaway")
    assert "throwaway" in build_registry().backends()
    monkeypatch.setenv("DILATED_ATTN_LOAD_PLUGINS", "other")
    registry = build_registry()
    assert "throwaway" not in registry.backends() and "sdpa" in registry.backends()


def test_cli_lists_plugins(installed_plugin):
    env = {"PYTHONPATH": f"{installed_plugin}:{':'.join(sys.path)}", "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-m", "dilated_attn", "plugins"], capture_output=True, text=True, env=env, check=True
    )
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["kind", "name", "distribution", "version"]
    row = next(line for line in lines if " throwaway " in line)
    assert "throwaway-plugin" in row and "1.2.3" in row and "note=test plugin" in row
    assert any(line.split()[:2] == ["attention", "sdpa"] for line in lines)


def test_pool_selection_prefers_highest_priority():
    class FastPool:
        @hookimpl
        def dilated_attn_register_pool(self, register):
            register("fast-test-pool", dict, priority=1000)

    registry = get_registry()
    name = registry.register(FastPool(), name="fast-pool-plugin")
    try:
        assert registry.default_pool().name == "fast-test-pool"
    finally:
        registry.unregister(name)
    assert registry.default_pool().name in {"python", "rust"}
    with pytest.raises(ValueError, match="pool='nope' is not a registered buffer pool"):
        registry.pool("nope")


def test_auto_skips_backends_without_dropout():
    class NoDropout:
        @hookimpl
        def dilated_attn_register_attention(self, register):
            def fn(q, k, v, pattern, request):
                assert request.dropout_p == 0.0, (
                    "auto must not pick a backend without dropout for dropout_p > 0"
                )
                return get_backend("sdpa").fn(q, k, v, pattern, request)

            register("fast-no-dropout", fn, devices=("cpu",), dropout=False, priority=1000)

    registry = get_registry()
    name = registry.register(NoDropout(), name="no-dropout-plugin")
    try:
        q = torch.randn(1, 16, 2, 8)
        assert registry.select(_request()).name == "fast-no-dropout"
        assert registry.select(_request(dropout_p=0.5)).name != "fast-no-dropout"
        out = dilated_attention(q, q, q, [8], [1], dropout_p=0.5)
        assert out.shape == q.shape
        with pytest.raises(
            ValueError, match="backend='fast-no-dropout' cannot run these inputs: dropout_p=0.5"
        ):
            dilated_attention(q, q, q, [8], [1], dropout_p=0.5, backend="fast-no-dropout")
    finally:
        registry.unregister(name)
