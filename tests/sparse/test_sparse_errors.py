"""Bad patterns and bad inputs raise ValueError/TypeError naming the argument, the value and the rule."""

from __future__ import annotations

import pytest
import torch
from dilated_attn_sparse import (
    block_sparse_attention,
    dilated_blocks,
    from_mask_mod,
    global_local,
    local_window,
    random_blocks,
    strided,
    union,
)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: local_window(-1), ValueError, r"window=-1 must be an int >= 0"),
        (lambda: local_window(2.5), TypeError, r"window=2.5 must be an int"),
        (lambda: local_window(True), TypeError, r"window=True must be an int"),
        (lambda: global_local(-2, 3), ValueError, r"global_tokens=-2 must be an int >= 0"),
        (lambda: global_local(2, -3), ValueError, r"window=-3 must be an int >= 0"),
        (lambda: strided(0), ValueError, r"stride=0 must be an int >= 1"),
        (lambda: random_blocks(0.0), ValueError, r"density=0.0 must be in \(0, 1\]"),
        (lambda: random_blocks(1.5), ValueError, r"density=1.5 must be in \(0, 1\]"),
        (lambda: random_blocks(-0.1), ValueError, r"density=-0.1 must be in \(0, 1\]"),
        (lambda: random_blocks("0.5"), TypeError, r"density='0.5' must be a float"),
        (lambda: random_blocks(0.5, seed=-1), ValueError, r"seed=-1 must be an int >= 0"),
        (
            lambda: random_blocks(0.5, block_size=96),
            ValueError,
            r"block_size=96 must be a positive power of 2",
        ),
        (lambda: dilated_blocks(0, 1), ValueError, r"segment_blocks=0 must be an int >= 1"),
        (lambda: dilated_blocks(4, 0), ValueError, r"dilation=0 must be an int >= 1"),
        (lambda: dilated_blocks(4, 8), ValueError, r"dilation=8 must be <= segment_blocks=4"),
        (
            lambda: dilated_blocks(4, 2, block_size=0),
            ValueError,
            r"block_size=0 must be a positive power of 2",
        ),
        (
            lambda: dilated_blocks(4, 2, block_size=-64),
            ValueError,
            r"block_size=-64 must be a positive power of 2",
        ),
        (lambda: dilated_blocks(4, 2, block_size=64.0), TypeError, r"block_size=64.0 must be an int"),
        (lambda: from_mask_mod("q >= kv"), TypeError, r"fn='q >= kv' must be callable"),
        (lambda: union(local_window(1)), ValueError, r"union of 1 pattern\(s\): it needs at least 2"),
        (lambda: union(local_window(1), "all"), TypeError, r"union part 1='all' must be a SparsePattern"),
        (lambda: local_window(1) & 3, TypeError, r"intersection part 1=3 must be a SparsePattern"),
    ],
)
def test_bad_pattern(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_bad_call():
    q = torch.randn(1, 32, 2, 8)
    with pytest.raises(TypeError, match=r"pattern=None must be a SparsePattern"):
        block_sparse_attention(q, q, q, None)
    with pytest.raises(ValueError, match=r"block_size=48 must be a positive power of 2"):
        block_sparse_attention(q, q, q, local_window(2), block_size=48)
    with pytest.raises(ValueError, match=r"block_size=0 must be a positive power of 2"):
        block_sparse_attention(q, q, q, local_window(2), block_size=0)
    with pytest.raises(ValueError, match="rank 4"):
        block_sparse_attention(q[0], q[0], q[0], local_window(2))
    with pytest.raises(ValueError, match=r"k.shape=\(1, 16, 2, 8\) must equal q.shape"):
        block_sparse_attention(q, q[:, :16], q, local_window(2))
    with pytest.raises(TypeError, match=r"v.dtype=torch.float64 must equal q.dtype"):
        block_sparse_attention(q, q, q.double(), local_window(2))
    with pytest.raises(ValueError, match=r"scale=-1.0 must be a finite positive number"):
        block_sparse_attention(q, q, q, local_window(2), scale=-1.0)
    with pytest.raises(ValueError, match="head_dim=0"):
        z = q[..., :0]
        block_sparse_attention(z, z, z, local_window(2))


def test_bad_stats_arguments():
    with pytest.raises(ValueError, match=r"seq_len=0 must be >= 1"):
        local_window(2).density(0)
    with pytest.raises(ValueError, match=r"num_heads=0 must be >= 1"):
        local_window(2).density(8, num_heads=0)
    with pytest.raises(ValueError, match=r"block_size=3 must be a positive power of 2"):
        local_window(2).density(8, block_size=3)


@pytest.mark.parametrize("value", ["no", "False", "", None, 0, 1, 2, 0.0, torch.tensor(True), [True]])
def test_causal_must_be_a_bool(value):
    q = torch.randn(1, 20, 2, 8)
    with pytest.raises(TypeError, match=r"causal=.* must be a bool \(got "):
        block_sparse_attention(q, q, q, local_window(2), causal=value)
    with pytest.raises(TypeError, match=r"causal=.* must be a bool"):
        local_window(2).density(20, causal=value)


@pytest.mark.parametrize("value", ["yes", None, 1, torch.tensor(False)])
def test_return_lse_must_be_a_bool(value):
    q = torch.randn(1, 20, 2, 8)
    with pytest.raises(TypeError, match=r"return_lse=.* must be a bool"):
        block_sparse_attention(q, q, q, local_window(2), return_lse=value)


def test_numpy_bool_is_a_bool():
    numpy = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 20, 2, 8, generator=g) for _ in range(3))
    for flag in (True, False):
        expected = block_sparse_attention(q, k, v, local_window(3), causal=flag, block_size=16)
        out = block_sparse_attention(q, k, v, local_window(3), causal=numpy.bool_(flag), block_size=16)
        assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "value, error, message",
    [
        ("0.5", TypeError, r"scale='0.5' must be a float"),
        (True, TypeError, r"scale=True must be a float"),
        ([0.5], TypeError, r"scale=\[0.5\] must be a float"),
        (float("nan"), ValueError, r"scale=nan must be a finite positive number"),
        (float("inf"), ValueError, r"scale=inf must be a finite positive number"),
        (0.0, ValueError, r"scale=0.0 must be a finite positive number"),
        (-2, ValueError, r"scale=-2 must be a finite positive number"),
    ],
)
def test_scale_is_checked(value, error, message):
    q = torch.randn(1, 20, 2, 8)
    with pytest.raises(error, match=message):
        block_sparse_attention(q, q, q, local_window(2), scale=value)


@pytest.mark.parametrize(
    "value, error, message",
    [
        (128.0, TypeError, r"block_size=128.0 must be an int"),
        ("128", TypeError, r"block_size='128' must be an int"),
        (True, TypeError, r"block_size=True must be an int"),
        (None, TypeError, r"block_size=None must be an int"),
        (-16, ValueError, r"block_size=-16 must be a positive power of 2"),
        (96, ValueError, r"block_size=96 must be a positive power of 2"),
        (2**20 + 1, ValueError, r"block_size=1048577 must be a positive power of 2"),
    ],
)
def test_block_size_is_checked(value, error, message):
    q = torch.randn(1, 20, 2, 8)
    with pytest.raises(error, match=message):
        block_sparse_attention(q, q, q, local_window(2), block_size=value)
    with pytest.raises(error, match=message):
        local_window(2).density(20, block_size=value)


@pytest.mark.parametrize(
    "value, error, message",
    [
        ([("BLOCK_M", 64)], TypeError, r"kernel_options=\[\('BLOCK_M', 64\)\] must be a mapping"),
        ("BLOCK_M=64", TypeError, r"kernel_options='BLOCK_M=64' must be a mapping"),
        ({1: 64}, TypeError, r"kernel_options key 1 must be a str"),
        ({"BLOCK_MM": 64}, ValueError, r"kernel_options key 'BLOCK_MM' is not a FlexKernelOptions name"),
        ({"fwd_block_m": 64}, ValueError, r"kernel_options key 'fwd_block_m' is not a FlexKernelOptions"),
        ({"fwd_BLOCK_M": "64"}, TypeError, r"kernel_options\['fwd_BLOCK_M'\]='64' must be an int"),
        ({"num_warps": True}, TypeError, r"kernel_options\['num_warps'\]=True must be an int"),
        ({"num_warps": -4}, ValueError, r"kernel_options\['num_warps'\]=-4 must be an int >= 0"),
        ({"PRESCALE_QK": 1}, TypeError, r"kernel_options\['PRESCALE_QK'\]=1 must be a bool"),
        ({"BACKEND": "CUDNN"}, ValueError, r"kernel_options\['BACKEND'\]='CUDNN' must be one of"),
    ],
)
def test_kernel_options_are_checked_on_every_device(value, error, message):
    q = torch.randn(1, 20, 2, 8)
    with pytest.raises(error, match=message):
        block_sparse_attention(q, q, q, local_window(2), kernel_options=value)


def test_valid_kernel_options_are_accepted_on_cpu():
    q = torch.randn(1, 20, 2, 8)
    options = {"fwd_BLOCK_M": 64, "bwd_num_warps": 4, "PRESCALE_QK": False, "BACKEND": "TRITON"}
    expected = block_sparse_attention(q, q, q, local_window(2), block_size=16)
    assert torch.equal(
        block_sparse_attention(q, q, q, local_window(2), block_size=16, kernel_options=options), expected
    )
