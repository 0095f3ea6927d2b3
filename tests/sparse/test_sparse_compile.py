"""One compile per shape: same-kind patterns share a graph, later calls never recompile.

Runs the CUDA code path's compile wrapper on the CPU with a counting Dynamo backend.
"""

from __future__ import annotations

import torch
from dilated_attn_sparse import BlockMaskCache, local_window, random_blocks
from dilated_attn_sparse.attention import _flex_bnhd
from dilated_attn_sparse.compiled import compiled
from dilated_attn_sparse.masks import _create


class CountingBackend:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: object) -> object:
        self.graphs += 1
        return gm.forward


def test_no_recompile_per_call_and_per_parameter():
    backend = CountingBackend()
    cache = BlockMaskCache()
    q = torch.randn(1, 48, 2, 8)
    flex = compiled(_flex_bnhd, ("test-flex", tuple(q.shape)), backend=backend)
    assert compiled(_flex_bnhd, ("test-flex", tuple(q.shape)), backend=backend) is flex
    for window in (3, 3, 5, 9):
        mask = cache.get(local_window(window), 48, 2, block_size=16)
        out, lse = flex(q, q, q, mask, 0.5, True)
        expected, _ = _flex_bnhd(q, q, q, mask, 0.5, True)
        assert torch.allclose(out, expected)
    assert backend.graphs == 1, "a new window recompiled"
    mask = cache.get(random_blocks(0.5, block_size=16), 48, 2, block_size=16)
    flex(q, q, q, mask, 0.5, True)
    flex(q, q, q, mask, 0.5, True)
    assert backend.graphs == 2, "a new pattern kind compiles once"


def test_mask_builder_compiles_without_graph_breaks():
    backend = CountingBackend()
    device = torch.device("cpu")
    for pattern in (local_window(2), local_window(5)):
        mask_mod = pattern.mask_mod(40, device)
        mask = compiled(_create, ("test-mask", 40), backend=backend)(mask_mod, None, None, 40, 8, device)
        expected = _create(mask_mod, None, None, 40, 8, device)
        assert torch.equal(mask.kv_num_blocks, expected.kv_num_blocks)
        assert torch.equal(mask.kv_indices, expected.kv_indices)
        assert torch.equal(mask.full_kv_num_blocks, expected.full_kv_num_blocks)
    assert backend.graphs == 1


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_each_key_gets_its_own_compile_budget():
    backend = CountingBackend()
    first = compiled(_double, ("test-budget", 1), backend=backend)
    second = compiled(_double, ("test-budget", 2), backend=backend)
    assert first is not second
    x = torch.ones(3)
    assert torch.equal(first(x), second(x))
    # Separate code objects: the second key compiled anew instead of reusing the first's entry.
    assert backend.graphs == 2
    first(x)
    second(x)
    assert backend.graphs == 2
