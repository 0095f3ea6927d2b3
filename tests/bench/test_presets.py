"""The presets are SPEC §3's table, and explicit flags override them."""

from __future__ import annotations

import pytest
import torch
from dilated_attn_bench.presets import PRESETS, Overrides, expand

LONGNET_W = (2048, 4096, 8192, 16384, 32768)


@pytest.mark.parametrize(
    ("name", "dtype", "batches", "lengths", "heads", "dim", "w", "r"),
    [
        ("longnet-1m", torch.bfloat16, (1,), (1_048_576,), 16, 64, LONGNET_W, (1, 2, 4, 8, 16)),
        ("longnet-256k", torch.bfloat16, (1,), (262_144,), 16, 64, LONGNET_W, (1, 2, 4, 8, 16)),
        ("paper", torch.bfloat16, (1,), (262_144,), 12, 64, LONGNET_W, (1, 2, 4, 6, 12)),
        (
            "seed-fp32",
            torch.float32,
            (1, 2, 4),
            (2048, 4096, 8192, 16384, 32768),
            8,
            64,
            (2048, 4096, 8192),
            (1, 2, 4),
        ),
        ("cpu-quick", torch.float32, (1,), (4096,), 4, 32, (512, 1024, 2048), (1, 2, 4)),
    ],
)
def test_presets_match_the_spec(name, dtype, batches, lengths, heads, dim, w, r):
    workloads = expand([name])
    assert [(x.batch, x.seq_len) for x in workloads] == [(b, n) for b in batches for n in lengths]
    for x in workloads:
        assert (x.dtype, x.heads, x.head_dim, x.segment_lengths, x.dilation_rates) == (
            dtype,
            heads,
            dim,
            w,
            r,
        )
        assert (x.causal, x.mode, x.preset) == (False, "longnet", name)


def test_overrides_apply_to_every_preset_and_duplicates_go():
    overrides = Overrides(seq_len=[1000, 3000], heads=2, causal=True, mode="head_groups")
    workloads = expand(["longnet-1m", "longnet-256k"], overrides)
    # Both presets become the same two workloads once n is overridden.
    assert [(x.preset, x.seq_len, x.heads, x.causal, x.mode) for x in workloads] == [
        ("longnet-1m*", 1000, 2, True, "head_groups"),
        ("longnet-1m*", 3000, 2, True, "head_groups"),
    ]


def test_bad_values_name_the_argument():
    with pytest.raises(ValueError, match="heads=0 must be a positive int"):
        expand(["cpu-quick"], Overrides(heads=0))
    with pytest.raises(ValueError, match=r"dilation_rates\[0\]=4096 must be <= segment_lengths\[0\]=512"):
        expand(["cpu-quick"], Overrides(dilation_rates=[4096, 1, 1]))
    with pytest.raises(ValueError, match="preset='nope' is not a known preset"):
        expand(["nope"])
    assert set(PRESETS) == {"longnet-1m", "longnet-256k", "paper", "seed-fp32", "cpu-quick"}
