"""Cached decoding through ``MultiheadDilatedAttention(cache=...)`` and ``LongNetLM.generate``."""

from __future__ import annotations

import pytest
import torch
from dilated_attn.models import LongNetLM
from dilated_attn.modules import MultiheadDilatedAttention
from dilated_attn.pool import PythonBufferPool
from dilated_attn.testing import TOLERANCES, relative_error


def _model(mode="longnet", num_kv_heads=None, seed=0):
    torch.manual_seed(seed)
    model = LongNetLM(
        37, 24, 2, 4, [4, 8, 16], [1, 2, 4], mode=mode, num_kv_heads=num_kv_heads, backend="reference"
    )
    return model.double().eval()


@pytest.mark.parametrize("mode,num_kv_heads", [("longnet", None), ("head_groups", 2), ("longnet", 1)])
def test_cached_forward_equals_full_forward(mode, num_kv_heads):
    model = _model(mode, num_kv_heads)
    tokens = torch.randint(0, 37, (3, 29), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    cache = model.new_cache(3)
    parts, start = [], 0
    for t in (7, 1, 1, 5, 1, 1, 13):
        parts.append(model(tokens[:, start : start + t], cache=cache))
        start += t
    assert relative_error(torch.cat(parts, 1), full) <= TOLERANCES[torch.float64][0]


@pytest.mark.parametrize("mode", ["longnet", "head_groups"])
def test_greedy_generate_equals_recomputed_argmax(mode):
    model = _model(mode, seed=3)
    prompt = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(2))
    pool = PythonBufferPool()
    out = model.generate(prompt, 20, pool=pool)
    assert out.shape == (2, 25) and torch.equal(out[:, :5], prompt)
    for n in range(5, 25):
        assert torch.equal(out[:, n], model(out[:, :n])[:, -1].argmax(-1)), f"token {n}"
    assert pool.stats()["in_use_bytes"] == 0 and pool.stats()["pinned_bytes"] == 0


def test_sampling_is_seeded_and_respects_top_k():
    model = _model(seed=4)
    prompt = torch.randint(0, 37, (4, 3), generator=torch.Generator().manual_seed(5))
    kw = dict(temperature=0.8, top_k=3)
    a = model.generate(prompt, 12, generator=torch.Generator().manual_seed(9), **kw)
    b = model.generate(prompt, 12, generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(a, b)
    for n in range(3, 15):
        top = model(a[:, :n])[:, -1].topk(3, dim=-1).indices
        assert (top == a[:, n : n + 1]).any(dim=-1).all()


def test_generate_argument_checks():
    model = _model()
    prompt = torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 3, top_k=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)


def test_module_refuses_a_mismatched_cache():
    attn = MultiheadDilatedAttention(16, 4, [4, 8], [1, 2], backend="reference")
    other = LongNetLM(11, 16, 1, 4, [4], [1]).new_cache(1)[0]
    with pytest.raises(ValueError, match="must match this module"):
        attn(torch.zeros(1, 2, 16), is_causal=True, cache=other)
    with pytest.raises(ValueError, match="is_causal"):
        attn(torch.zeros(1, 2, 16), cache=other)


@pytest.mark.parametrize("offset", [16, 32])
def test_position_offset_places_a_chunk_in_the_sequence(offset):
    """Every segment (w <= 16) lies inside the chunk at a multiple of 16, so the chunk attends only to
    itself: its logits equal the full sequence's rows exactly when its positions start at the offset."""
    model = _model(seed=4)
    tokens = torch.randint(0, 37, (2, 48), generator=torch.Generator().manual_seed(5))
    full = model(tokens)
    chunk = tokens[:, offset : offset + 16]
    got = model(chunk, position_offset=offset)
    assert relative_error(got, full[:, offset : offset + 16]) <= TOLERANCES[torch.float64][0]
    # Without the offset the chunk sits at positions 0..15 and its logits differ.
    assert relative_error(model(chunk), full[:, offset : offset + 16]) > 1e-3


def test_position_offset_argument_checks():
    model = _model()
    tokens = torch.zeros(1, 4, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"position_offset=2.0 must be an int \(got float\)"):
        model(tokens, position_offset=2.0)
    with pytest.raises(TypeError, match="position_offset=True must be an int"):
        model(tokens, position_offset=True)
    with pytest.raises(ValueError, match="position_offset=-1 must be >= 0"):
        model(tokens, position_offset=-1)
    with pytest.raises(ValueError, match="position_offset=4 cannot be combined with cache="):
        model(tokens, model.new_cache(1), position_offset=4)
    # Zero is the default, accepted with a cache.
    assert model(tokens, model.new_cache(1), position_offset=0).shape == (1, 4, 37)
