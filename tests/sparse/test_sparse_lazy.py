"""Installing the sparse package costs a program nothing until it runs block-sparse attention.

FlexAttention pulls in the compiler stack (sympy and hundreds of modules, seconds of import). The
package, its patterns and the registry must load none of it; the first call does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch.nn.attention.flex_attention", "sympy", "torch._dynamo", "torch._inductor")


def _heavy_loaded_after(code: str) -> dict[str, list[str]]:
    """Run ``code`` in a fresh interpreter; its ``checkpoint(name)`` calls record which heavy modules are loaded by then."""
    script = (
        textwrap.dedent(
            f"""
        import json, sys
        stages = {{}}
        def checkpoint(name):
            stages[name] = [m for m in {HEAVY!r} if m in sys.modules]
        """
        )
        + textwrap.dedent(code)
        + "\nprint(json.dumps(stages))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_package_and_patterns_load_no_flex_attention():
    stages = _heavy_loaded_after(
        """
        import torch
        checkpoint("torch")
        import dilated_attn_sparse
        import dilated_attn_sparse.patterns
        from dilated_attn_sparse import (
            BlockMaskCache, SparsityStats, block_masks, dilated_blocks, from_mask_mod, global_local,
            local_window, random_blocks, strided, union,
        )
        from dilated_attn_sparse import cache, compiled, predicates, stats, tuning, validation
        pattern = union(local_window(3), dilated_blocks(4, 2), strided(5)) & global_local(1, 9)
        pattern = pattern | random_blocks(0.5) | from_mask_mod(lambda b, h, q, kv: q >= kv)
        hash(pattern), pattern.per_head, dir(dilated_attn_sparse)
        checkpoint("import")
        from dilated_attn_sparse import block_sparse_attention
        checkpoint("first use")
        q = torch.randn(1, 20, 2, 8)
        block_sparse_attention(q, q, q, pattern, block_size=16)
        checkpoint("call")
        """
    )
    assert stages["torch"] == [], "torch alone must not load these; the check below would be void"
    assert stages["import"] == [], f"importing the package loaded {stages['import']}"
    assert "torch.nn.attention.flex_attention" in stages["first use"]
    assert "sympy" in stages["call"]


def test_unknown_attribute_is_an_attribute_error():
    import dilated_attn_sparse

    with pytest.raises(AttributeError, match="has no attribute 'block_sparse_attentoin'"):
        dilated_attn_sparse.block_sparse_attentoin  # noqa: B018 - the attribute access is the test
    assert "block_sparse_attention" in dir(dilated_attn_sparse)


def test_registry_with_the_sparse_plugin_loads_no_flex_attention():
    stages = _heavy_loaded_after(
        """
        import dilated_attn_sparse.plugin as plugin
        from dilated_attn.registry import build_registry
        registry = build_registry(autoload=False)
        registry.register(plugin, name="sparse")
        checkpoint("registry")
        """
    )
    assert stages["registry"] == [], f"building the registry loaded {stages['registry']}"
