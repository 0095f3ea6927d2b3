"""The "block_sparse" backend through the plugin hook, the functional API and the multihead module."""

from __future__ import annotations

import sys
from pathlib import Path

import dilated_attn_sparse.plugin as sparse_plugin
import pytest
import sparse_rules as rules
import torch
from dilated_attn import MultiheadDilatedAttention, dilated_attention
from dilated_attn.registry import LOAD_PLUGINS_ENV, build_registry, get_registry, reset_registry
from dilated_attn.testing import relative_error
from dilated_attn_sparse import block_sparse_attention, dilated_blocks, local_window
from dilated_attn_sparse.reference import masked_attention_reference
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[2] / "packages" / "sparse" / "pyproject.toml"


@pytest.fixture
def registered(monkeypatch):
    """The process registry with only the built-ins and this plugin, whatever is installed."""
    monkeypatch.setenv(LOAD_PLUGINS_ENV, "")
    reset_registry()
    registry = get_registry()
    name = registry.register(sparse_plugin, name="sparse")
    try:
        yield registry
    finally:
        registry.unregister(name)
        reset_registry()


def test_entry_point_names_the_plugin_module():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["entry-points"]["dilated_attn"] == {"sparse": "dilated_attn_sparse.plugin"}
    siblings = [Requirement(d).name for d in project["dependencies"] if d.startswith("dilated-attn")]
    assert siblings == ["dilated-attn-core"]


def test_capabilities():
    registry = build_registry(autoload=False)
    registry.register(sparse_plugin, name="sparse")
    backend = registry.attention("block_sparse")
    assert backend.capabilities.requires == ("pattern",)
    assert backend.capabilities.auto is False
    assert backend.capabilities.backward and backend.capabilities.causal
    assert backend.source.plugin == "sparse"


def test_functional_forwards_pattern_and_ignores_segments(registered):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 45, 4, 8, generator=g) for _ in range(3))
    pattern = local_window(5) | dilated_blocks(2, 2, 16)
    out, lse = dilated_attention(
        q,
        k,
        v,
        [8, 16],
        [1, 2],
        causal=True,
        return_lse=True,
        backend="block_sparse",
        pattern=pattern,
        block_size=16,
    )
    expected, expected_lse = block_sparse_attention(
        q, k, v, pattern, causal=True, block_size=16, return_lse=True
    )
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    allowed = rules.dense(rules.any_of(rules.local(5), rules.dilated(2, 2, 16)), 45, 4, causal=True)
    assert relative_error(out, masked_attention_reference(q, k, v, allowed)) <= 1e-5


def test_missing_pattern_is_refused(registered):
    q = torch.randn(1, 16, 2, 8)
    with pytest.raises(
        ValueError,
        match=r"backend='block_sparse' cannot run these inputs: keyword arguments \['pattern'\] required",
    ):
        dilated_attention(q, q, q, [8], [1], backend="block_sparse")
    with pytest.raises(ValueError, match=r"keyword arguments \['pattern'\] required"):
        dilated_attention(q, q, q, [8], [1], backend="block_sparse", pattern=None)


def test_dropout_is_refused(registered):
    q = torch.randn(1, 16, 2, 8)
    with pytest.raises(
        ValueError, match=r"backend='block_sparse' cannot run these inputs: dropout_p=0.1 not supported"
    ):
        dilated_attention(q, q, q, [8], [1], dropout_p=0.1, backend="block_sparse", pattern=local_window(2))


def test_multihead_module_runs_the_backend(registered):
    torch.manual_seed(0)
    module = MultiheadDilatedAttention(
        32, 4, [16], [1], backend="block_sparse", pattern=local_window(6), block_size=16
    )
    x = torch.randn(2, 50, 32, requires_grad=True)
    y, _ = module(x, is_causal=True)
    q, k, v = (proj(x).view(2, 50, 4, 8) for proj in (module.q_proj, module.k_proj, module.v_proj))
    attended = block_sparse_attention(q, k, v, local_window(6), causal=True, block_size=16)
    assert torch.allclose(y, module.out_proj(module.norm(attended.reshape(2, 50, 32))))
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
