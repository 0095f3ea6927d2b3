"""A broken plugin is skipped with one warning naming it; built-ins and other plugins keep working."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import textwrap

import pytest
import torch
from dilated_attn import __main__ as cli
from dilated_attn import dilated_attention, registry
from dilated_attn.registry import PluginWarning, build_registry

GOOD = """
from dilated_attn import hookimpl, get_backend

@hookimpl
def dilated_attn_register_attention(register):
    register("good", lambda q, k, v, pattern, request: get_backend("sdpa").fn(q, k, v, pattern, request), auto=False)
"""

BROKEN = {
    "raises_on_import": "raise RuntimeError('plugin module is broken')",
    "hook_raises": """
from dilated_attn import hookimpl

@hookimpl
def dilated_attn_register_attention(register):
    raise KeyError('boom')
""",
    "misspelt_hook": """
from dilated_attn import hookimpl

@hookimpl
def dilated_attn_register_attentoin(register):
    pass
""",
    "wrong_hook_signature": """
from dilated_attn import hookimpl

@hookimpl
def dilated_attn_register_attention(register, extra):
    pass
""",
    "takes_sdpa": """
from dilated_attn import hookimpl

@hookimpl
def dilated_attn_register_attention(register):
    register("sdpa", lambda *a: None)
""",
    "takes_python_pool": """
from dilated_attn import hookimpl

@hookimpl
def dilated_attn_register_pool(register):
    register("python", lambda budget_bytes=None: None)
""",
    "unknown_capability": """
from dilated_attn import hookimpl

@hookimpl
def dilated_attn_register_attention(register):
    register("mine", lambda *a: None, head_dimz=(16, 64))
""",
    "bad_priority": """
from dilated_attn import hookimpl

@hookimpl
def dilated_attn_register_attention(register):
    register("mine2", lambda *a: None, priority="high")
""",
    "takes_good": """
from dilated_attn import hookimpl

@hookimpl
def dilated_attn_register_attention(register):
    register("good", lambda *a: None)
""",
}


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "good_plugin.py").write_text(textwrap.dedent(GOOD))
    for name, body in BROKEN.items():
        (tmp_path / f"{name}_plugin.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ["good", *BROKEN]:
        sys.modules.pop(f"{name}_plugin", None)


def _entry_points(names):
    eps = [importlib.metadata.EntryPoint("good", "good_plugin", registry.ENTRY_POINT_GROUP)]
    for name in names:
        eps.append(importlib.metadata.EntryPoint(name, f"{name}_plugin", registry.ENTRY_POINT_GROUP))
    return eps


CASES = [*BROKEN, "missing_module"]


@pytest.mark.parametrize("broken", CASES)
def test_broken_plugin_is_skipped_with_a_warning(plugin_dir, monkeypatch, broken):
    eps = _entry_points([broken])
    if broken == "missing_module":
        eps[-1] = importlib.metadata.EntryPoint(broken, "no_such_module_anywhere", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: eps)
    monkeypatch.delenv(registry.LOAD_PLUGINS_ENV, raising=False)
    with pytest.warns(PluginWarning, match=f"plugin '{broken}'") as caught:
        built = build_registry()
    assert len([w for w in caught if issubclass(w.category, PluginWarning)]) == 1
    assert [f.source.plugin for f in built.failures()] == [broken]
    assert {"sdpa", "reference", "good"} <= set(built.backends())
    assert "python" in built.pools() and built.pools()["python"].source.plugin == "core"
    assert built.attention("sdpa").source.plugin == "core"
    assert "mine" not in built.backends() and "mine2" not in built.backends()
    # Calls through the built registry keep working, built-in and plugin alike.
    monkeypatch.setattr(registry, "_registry", built)
    q = torch.randn(1, 12, 2, 8)
    expected = dilated_attention(q, q, q, [4], [1], backend="sdpa")
    torch.testing.assert_close(dilated_attention(q, q, q, [4], [1], backend="good"), expected)
    torch.testing.assert_close(dilated_attention(q, q, q, [4], [1]), expected)


def test_cli_lists_failed_plugins(plugin_dir, monkeypatch, capsys):
    monkeypatch.setattr(registry, "_entry_points", lambda: _entry_points(["hook_raises", "raises_on_import"]))
    monkeypatch.delenv(registry.LOAD_PLUGINS_ENV, raising=False)
    with pytest.warns(PluginWarning):
        monkeypatch.setattr(registry, "_registry", build_registry())
    assert cli.main(["plugins", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {f["plugin"] for f in listed["failed"]} == {"hook_raises", "raises_on_import"}
    assert any("KeyError" in f["error"] for f in listed["failed"])
    assert {r["name"] for r in listed["registered"]} >= {"sdpa", "good"}
    assert cli.main(["plugins"]) == 0
    table = capsys.readouterr().out
    assert "failed  hook_raises" in table and "RuntimeError" in table


def test_allow_list_names_without_entry_points_are_reported(plugin_dir, monkeypatch):
    monkeypatch.setattr(registry, "_entry_points", lambda: _entry_points([]))
    monkeypatch.setenv(registry.LOAD_PLUGINS_ENV, "good, nope ,also_nope")
    with pytest.warns(PluginWarning) as caught:
        built = build_registry()
    messages = " ".join(str(w.message) for w in caught)
    assert "'nope'" in messages and "'also_nope'" in messages
    assert "good" in built.backends()


def test_explicit_replace_may_take_a_builtin_name(plugin_dir, monkeypatch):
    (plugin_dir / "replacer_plugin.py").write_text(
        textwrap.dedent(
            """
            from dilated_attn import hookimpl

            def mine(q, k, v, pattern, request):
                raise NotImplementedError

            @hookimpl
            def dilated_attn_register_attention(register):
                register("reference", mine, replace=True, auto=False)
            """
        )
    )
    eps = [importlib.metadata.EntryPoint("replacer", "replacer_plugin", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry, "_entry_points", lambda: eps)
    monkeypatch.delenv(registry.LOAD_PLUGINS_ENV, raising=False)
    built = build_registry()
    assert built.attention("reference").source.plugin == "replacer"
    assert not built.failures()
    sys.modules.pop("replacer_plugin", None)


def test_in_process_registration_that_breaks_a_rule_raises_and_is_not_kept():
    from dilated_attn import hookimpl
    from dilated_attn.registry import RegistrationError, get_registry

    class Bad:
        @hookimpl
        def dilated_attn_register_attention(self, register):
            register("sdpa", lambda *a: None)

    reg = get_registry()
    with pytest.raises(RegistrationError, match="'sdpa' .* is a built-in; pass replace=True"):
        reg.register(Bad(), name="bad")
    assert reg.attention("sdpa").source.plugin == "core"
    assert not reg.plugin_manager.has_plugin("bad")
