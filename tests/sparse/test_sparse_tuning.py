"""Default FlexAttention options: how a mask is classified, and when the Hopper tiles apply."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from dilated_attn_sparse import dilated_blocks, local_window, random_blocks
from dilated_attn_sparse.cache import BlockMaskCache
from dilated_attn_sparse.tuning import SCATTERED_BELOW, default_kernel_options, neighbour_share

N, HEADS, BLOCK = 4096, 4, 64


def _mask(pattern, block=BLOCK):
    return BlockMaskCache().get(pattern, N, HEADS, block_size=block)


def test_neighbour_share_separates_windows_from_random_blocks():
    window = neighbour_share(_mask(local_window(300)))
    dilated = neighbour_share(_mask(dilated_blocks(16, 4, BLOCK)))
    sparse = neighbour_share(_mask(random_blocks(0.05, seed=3, block_size=BLOCK)))
    assert window > 0.8 and dilated > SCATTERED_BELOW
    # Random block pairs: the next query block keeps a key block with probability ~ density.
    assert sparse < 0.15 < SCATTERED_BELOW


def test_neighbour_share_is_computed_once_per_mask(monkeypatch):
    mask = _mask(local_window(100))
    first = neighbour_share(mask)
    monkeypatch.setattr(type(mask), "to_dense", lambda self: pytest.fail("recomputed"))
    assert neighbour_share(mask) == first


def _hopper_query(dtype=torch.bfloat16, head_dim=64):
    return SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(1, N, HEADS, head_dim))


def test_hopper_defaults_depend_on_the_mask(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    window = default_kernel_options(_mask(local_window(300), 128), _hopper_query(), 128)
    sparse = default_kernel_options(_mask(random_blocks(0.05, block_size=128), 128), _hopper_query(), 128)
    assert window is not None and sparse is not None
    assert window["bwd_BLOCK_M1"] == 32 and "fwd_BLOCK_N" not in window
    assert sparse["fwd_BLOCK_N"] == 64 and sparse["bwd_BLOCK_N2"] == 32


@pytest.mark.parametrize(
    "capability, dtype, head_dim, block",
    [
        ((8, 0), torch.bfloat16, 64, 128),
        ((9, 0), torch.float32, 64, 128),
        ((9, 0), torch.float16, 128, 128),
        ((9, 0), torch.bfloat16, 64, 64),
    ],
    ids=["ampere", "fp32", "d128", "block64"],
)
def test_no_defaults_outside_what_was_measured(monkeypatch, capability, dtype, head_dim, block):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    mask = _mask(local_window(300), block)
    assert default_kernel_options(mask, _hopper_query(dtype, head_dim), block) is None


def test_no_defaults_on_cpu():
    mask = _mask(local_window(300))
    assert default_kernel_options(mask, torch.empty(1, N, HEADS, 64), BLOCK) is None


def _share_from_dense(mask):
    dense = mask.to_dense().bool()
    shared = computed = 0
    for rows in dense.flatten(0, 1):
        active = rows[rows.any(dim=1)]
        shared += int((active[:-1] & active[1:]).sum())
        computed += int(active[:-1].sum())
    return shared / computed


@pytest.mark.parametrize("rows", [1, 3, 1024])
def test_neighbour_share_in_slabs_matches_the_dense_mask(monkeypatch, rows):
    from dilated_attn_sparse import tuning

    monkeypatch.setattr(tuning, "_ROWS", rows)
    # Per-head dilated blocks leave empty query blocks, also across slab edges; the union mixes
    # full and partial blocks.
    for pattern in (dilated_blocks(6, 3, BLOCK), local_window(150) | random_blocks(0.1, 1, BLOCK)):
        mask = BlockMaskCache().get(pattern, 1000, HEADS, block_size=BLOCK)
        assert neighbour_share(mask) == pytest.approx(_share_from_dense(mask))
