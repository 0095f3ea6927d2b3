"""The backend contract: one front door, typed capabilities, auto that never picks a backend that refuses."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from dilated_attn import dilated_attention, hookimpl
from dilated_attn.pattern import DilationPattern
from dilated_attn.reference import dilated_attention_reference
from dilated_attn.registry import Capabilities, RegistrationError, get_registry
from dilated_attn.request import Request
from dilated_attn.testing import TOLERANCES, relative_error

PACKAGES = pathlib.Path(__file__).resolve().parents[2] / "packages"


def _qkv(b=1, n=24, h=4, d=8, h_kv=None, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=g, dtype=dtype)
    k, v = (torch.randn(b, n, h_kv or h, d, generator=g, dtype=dtype) for _ in range(2))
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


class NarrowPlugin:
    """A third-party backend for head_dim 16..32 only, preferred over everything."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    @hookimpl
    def dilated_attn_register_attention(self, register):
        sdpa = get_registry().attention("sdpa").fn

        def narrow(q, k, v, pattern: DilationPattern, request: Request):
            self.calls.append(request.head_dim)
            return sdpa(q, k, v, pattern, request)

        register("narrow", narrow, head_dims=(16, 32), priority=1000, dtypes=(torch.float32, torch.float64))


@pytest.fixture
def narrow():
    registry = get_registry()
    plugin = NarrowPlugin()
    name = registry.register(plugin, name="narrow-plugin")
    try:
        yield plugin
    finally:
        registry.unregister(name)


@pytest.mark.parametrize("head_dim", [8, 16, 24, 32, 40])
def test_auto_uses_narrow_backend_inside_its_range_and_falls_back_outside(narrow, head_dim):
    q, k, v = _qkv(n=21, d=head_dim, dtype=torch.float32, seed=head_dim)
    out = dilated_attention(q, k, v, [8, 16], [1, 2], causal=True)
    expected = dilated_attention(q, k, v, [8, 16], [1, 2], causal=True, backend="sdpa")
    inside = 16 <= head_dim <= 32
    assert narrow.calls == ([head_dim] if inside else [])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_named_backend_outside_its_range_is_refused(narrow):
    q, k, v = _qkv(d=8, dtype=torch.float32)
    with pytest.raises(
        ValueError, match=r"backend='narrow' cannot run these inputs: head_dim 8 outside \[16, 32\]"
    ):
        dilated_attention(q, k, v, [8], [1], backend="narrow")


@pytest.mark.parametrize(
    "caps, match",
    [
        ({"head_dimz": (1, 2)}, "unknown capabilities"),
        ({"priority": "high"}, "priority='high' must be an int"),
        ({"head_dims": (32, 16)}, "head_dims"),
        ({"devices": [1]}, "must be strings"),
        ({"dtypes": ["float32"]}, "torch.dtypes"),
        ({"modes": ("dense",)}, "unknown mode"),
        ({"causal": "yes"}, "must be a bool"),
        ({"requires": ("pattern",)}, "must also be listed in options"),
    ],
)
def test_bad_capabilities_are_refused_naming_the_plugin(caps, match):
    with pytest.raises(RegistrationError, match=match) as info:
        Capabilities.build("attention backend 'x' of plugin 'p'", caps)
    assert "plugin 'p'" in str(info.value)


def test_free_form_metadata_goes_under_extra():
    caps = Capabilities.build("x", {"extra": {"paper": "LongNet"}, "priority": 3})
    assert caps.extra["paper"] == "LongNet" and caps.priority == 3
    assert caps.as_dict()["paper"] == "LongNet"


def test_auto_with_pool_picks_a_backend_that_takes_it():
    from dilated_attn.pool import PythonBufferPool

    q, k, v = _qkv(dtype=torch.float32)
    pool = PythonBufferPool()
    out = dilated_attention(q, k, v, [8, 16], [1, 2], pool=pool)
    assert pool.stats()["hits"] + pool.stats()["misses"] >= 1
    torch.testing.assert_close(out, dilated_attention(q, k, v, [8, 16], [1, 2]))


@pytest.mark.parametrize("h, h_kv", [(4, 2), (6, 3), (4, 1), (6, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["longnet", "head_groups"])
def test_grouped_query_attention_matches_oracle_on_repeated_kv(h, h_kv, causal, mode):
    q, k, v = _qkv(n=29, h=h, h_kv=h_kv, dtype=torch.float32, seed=h * 10 + h_kv, grad=True)
    out = dilated_attention(q, k, v, [6, 12], [2, 3], mode=mode, causal=causal)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    rep = h // h_kv
    ref = dilated_attention_reference(
        q64,
        k64.repeat_interleave(rep, 2),
        v64.repeat_interleave(rep, 2),
        [6, 12],
        [2, 3],
        mode=mode,
        causal=causal,
    )
    fwd_tol, grad_tol = TOLERANCES[torch.float32]
    assert relative_error(out, ref) <= fwd_tol
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (ref * grad.double()).sum().backward()
    assert k.grad.shape == k.shape
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        assert relative_error(ours.grad, theirs.grad) <= grad_tol


def test_lse_layouts():
    q, k, v = _qkv()
    _, lse = dilated_attention(q, k, v, [8], [1], return_lse=True)
    _, lse_bhn = dilated_attention(q, k, v, [8], [1], return_lse=True, lse_layout="bhn")
    assert lse.shape == (1, 24, 4) and lse_bhn.shape == (1, 4, 24)
    torch.testing.assert_close(lse_bhn, lse.transpose(1, 2))
    with pytest.raises(ValueError, match="lse_layout='hbn'"):
        dilated_attention(q, k, v, [8], [1], return_lse=True, lse_layout="hbn")


def _top_level_imports(path: pathlib.Path, package: str, modules: set[str]) -> set[str]:
    """Modules of ``package`` that ``path`` imports at module level (imports inside functions are lazy)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(package))
    return found


@pytest.mark.parametrize(
    "package, src",
    [
        ("dilated_attn", "core/src"),
        ("dilated_attn_ring", "ring/src"),
        ("dilated_attn_sparse", "sparse/src"),
        ("dilated_attn_bench", "bench/src"),
    ],
)
def test_no_import_cycle(package, src):
    """The graph of module-level imports between a package's modules has no cycle."""
    root = PACKAGES / src
    modules: dict[str, pathlib.Path] = {}
    for path in (root / package).rglob("*.py"):
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        modules[".".join(parts)] = path
    # Package __init__ modules are re-export facades that every submodule's import runs first anyway;
    # a cycle worth the name runs through modules that do work (functional -> registry -> ...).
    facades = {name for name, path in modules.items() if path.name == "__init__.py"}
    graph = {
        name: {
            t
            for t in _top_level_imports(path, package, set(modules))
            if t in modules and t not in facades and t != name
        }
        for name, path in modules.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
