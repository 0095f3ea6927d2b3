"""Every argument is honoured or refused at the boundary, with an error naming argument, value and rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dilated_attn import LongNetLM, MultiheadDilatedAttention, dilated_attention, get_pool
from dilated_attn.modules import DilatedAttention
from dilated_attn.pool import PythonBufferPool
from dilated_attn.reference import dilated_attention_reference

W, R = [4, 8], [1, 2]


def _qkv(n=16, h=2, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, n, h, d, generator=g, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("name", ["causal", "is_causal"])
@pytest.mark.parametrize("value", ["False", "no", 0, 1, 2, 1.0, torch.tensor(True), [True]])
def test_causal_flags_must_be_bools(name, value):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=f"{name}=.* must be a bool"):
        dilated_attention(q, k, v, W, R, **{name: value})


@pytest.mark.parametrize("name", ["return_lse", "enable_gqa"])
@pytest.mark.parametrize("value", ["True", 1, torch.tensor(False)])
def test_other_flags_must_be_bools(name, value):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=f"{name}=.* must be a bool"):
        dilated_attention(q, k, v, W, R, **{name: value})


def test_numpy_bool_is_a_bool():
    q, k, v = _qkv()
    torch.testing.assert_close(
        dilated_attention(q, k, v, W, R, causal=np.bool_(True)), dilated_attention(q, k, v, W, R, causal=True)
    )


def test_is_causal_is_causal():
    q, k, v = _qkv(dtype=torch.float64)
    ref = dilated_attention_reference(q, k, v, W, R, causal=True)
    torch.testing.assert_close(dilated_attention(q, k, v, W, R, is_causal=True), ref)
    torch.testing.assert_close(dilated_attention(q, k, v, W, R, causal=True, is_causal=True), ref)
    with pytest.raises(ValueError, match="disagree"):
        dilated_attention(q, k, v, W, R, causal=True, is_causal=False)


@pytest.mark.parametrize("kwargs", [{"is_causl": True}, {"group": None}, {"pattern": 3}, {"dropout": 0.1}])
def test_unknown_keywords_are_type_errors(kwargs):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        dilated_attention(q, k, v, W, R, **kwargs)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        dilated_attention(q, k, v, W, R, backend="sdpa", **kwargs)


@pytest.mark.parametrize(
    "scale, error",
    [
        (1e38, ValueError),
        (float("inf"), ValueError),
        (float("nan"), ValueError),
        (0.0, ValueError),
        (-1.0, ValueError),
        ("0.1", TypeError),
        (True, TypeError),
        (torch.tensor(0.1), TypeError),
    ],
)
def test_scale_rule(scale, error):
    q, k, v = _qkv()
    with pytest.raises(error, match="scale="):
        dilated_attention(q, k, v, W, R, scale=scale)


def test_numpy_scalars_are_numbers():
    q, k, v = _qkv(dtype=torch.float64)
    out = dilated_attention(q, k, v, np.array([4, 8]), [np.int64(1), np.int32(2)], scale=np.float32(0.25))
    torch.testing.assert_close(out, dilated_attention_reference(q, k, v, W, R, scale=0.25))
    mha = MultiheadDilatedAttention(np.int64(16), np.int32(2), W, R, num_kv_heads=np.int64(1))
    assert mha.num_heads == 2 and mha.num_kv_heads == 1
    pool = PythonBufferPool(budget_bytes=np.int64(1 << 20))
    assert pool.budget_bytes == 1 << 20
    lease = pool.acquire((np.int64(4), np.int32(8)), torch.float32, "cpu")
    assert lease.tensor.shape == (4, 8)
    pool.release(lease)


@pytest.mark.parametrize(
    "w, r, match",
    [([2**70], [1], "at most 2\\*\\*62"), ([2**63], [2**63], "at most"), ([8, 2**64], [1, 2], "at most")],
)
def test_huge_pattern_values_are_named(w, r, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        dilated_attention(q, k, v, w, r)


@pytest.mark.parametrize("dropout_p", [-0.1, 1.0, float("nan"), "0.1", None])
def test_dropout_rule(dropout_p):
    q, k, v = _qkv()
    with pytest.raises((TypeError, ValueError), match="dropout_p="):
        dilated_attention(q, k, v, W, R, dropout_p=dropout_p)


@pytest.mark.parametrize("pool", [object(), "rust", 3])
def test_pool_must_be_a_buffer_pool(pool):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="pool=.* must be a dilated_attn.pool.BufferPool"):
        dilated_attention(q, k, v, W, R, pool=pool)


def test_pool_factory_is_refused_with_the_fix():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"pool factory; call it"):
        dilated_attention(q, k, v, W, R, pool=get_pool("auto"))
    out = dilated_attention(q, k, v, W, R, pool=get_pool("auto")())
    torch.testing.assert_close(out, dilated_attention(q, k, v, W, R))


def test_pool_on_a_backend_without_pools_is_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="pool= not supported"):
        dilated_attention(q, k, v, W, R, backend="reference", pool=PythonBufferPool())


@pytest.mark.parametrize("shape", [(1, 16), (1, 1, 1, 16)])
def test_boolean_key_attn_mask_is_a_padding_mask(shape):
    q, k, v = _qkv(dtype=torch.float64)
    keep = torch.ones(16, dtype=torch.bool)
    keep[[3, 9, 10]] = False
    out = dilated_attention(q, k, v, W, R, attn_mask=keep.reshape(shape))
    ref = dilated_attention_reference(q, k, v, W, R, key_padding_mask=~keep.reshape(1, 16))
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize(
    "mask, error",
    [
        (torch.zeros(1, 1, 16, 16, dtype=torch.bool), ValueError),
        (torch.zeros(16, 16, dtype=torch.bool), ValueError),
        (torch.zeros(1, 16), TypeError),
        ([[True] * 16], TypeError),
    ],
)
def test_other_attn_masks_are_refused_with_what_to_pass(mask, error):
    q, k, v = _qkv()
    with pytest.raises(error, match="key_padding_mask"):
        dilated_attention(q, k, v, W, R, attn_mask=mask)


def test_enable_gqa_false_demands_equal_heads():
    q, _, _ = _qkv(h=4)
    k, v = _qkv(h=2)[:2]
    with pytest.raises(ValueError, match="enable_gqa=False"):
        dilated_attention(q, k, v, W, R, enable_gqa=False)
    with pytest.raises(ValueError, match="must divide"):
        dilated_attention(q, _qkv(h=3)[0], _qkv(h=3)[1], W, R)


# -- modules ------------------------------------------------------------------------------------------


def test_module_causal_is_honoured_and_inherited():
    torch.manual_seed(0)
    causal = MultiheadDilatedAttention(16, 2, W, R, causal=True, layer_norm=False)
    plain = MultiheadDilatedAttention(16, 2, W, R, layer_norm=False)
    plain.load_state_dict(causal.state_dict())
    x = torch.randn(2, 16, 16)
    y = causal(x)[0]
    torch.testing.assert_close(y, plain(x, is_causal=True)[0])
    torch.testing.assert_close(causal(x, is_causal=False)[0], plain(x)[0])
    assert not torch.allclose(y, plain(x)[0])
    # Future tokens do not leak: changing the last token leaves earlier outputs alone.
    x2 = x.clone()
    x2[:, -1] += 1.0
    torch.testing.assert_close(causal(x2)[0][:, :-1], y[:, :-1])
    assert "causal=True" in repr(causal)


def test_module_batch_first_false_is_honoured():
    torch.manual_seed(0)
    mha = MultiheadDilatedAttention(16, 2, W, R, batch_first=True)
    seq_first = MultiheadDilatedAttention(16, 2, W, R, batch_first=False)
    seq_first.load_state_dict(mha.state_dict())
    x = torch.randn(3, 16, 16)
    torch.testing.assert_close(seq_first(x.transpose(0, 1))[0], mha(x)[0].transpose(0, 1))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"causal": "yes"}, TypeError, "causal="),
        ({"batch_first": 0}, TypeError, "batch_first="),
        ({"group": None}, TypeError, "unexpected keyword arguments \\['group'\\] with backend='auto'"),
        ({"backend": "sdpa", "pattern": 1}, TypeError, "unexpected keyword arguments \\['pattern'\\]"),
        ({"backend": "nope"}, ValueError, "not a registered attention backend"),
        ({"dropout": 1.5}, ValueError, "dropout_p="),
        ({"num_kv_heads": 3}, ValueError, "num_kv_heads"),
        ({"bias": "no"}, TypeError, "bias="),
    ],
)
def test_module_keywords_are_honoured_or_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultiheadDilatedAttention(16, 2, W, R, **kwargs)


def test_module_forward_refusals():
    mha = MultiheadDilatedAttention(16, 2, W, R)
    x = torch.randn(1, 16, 16)
    with pytest.raises(ValueError, match="need_weights=True"):
        mha(x, need_weights=True)
    with pytest.raises(TypeError, match="is_causal="):
        mha(x, is_causal="yes")
    with pytest.raises(ValueError, match="attn_mask.shape"):
        mha(x, attn_mask=torch.ones(16, 16, dtype=torch.bool))


def test_module_grouped_heads_are_not_repeated(monkeypatch):
    """The module hands K/V with their own heads to the front door."""
    import dilated_attn.modules as modules

    seen = {}
    real = modules.dilated_attention

    def spy(q, k, v, *args, **kwargs):
        seen["shapes"] = (q.shape, k.shape)
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(modules, "dilated_attention", spy)
    MultiheadDilatedAttention(16, 4, W, R, num_kv_heads=2)(torch.randn(1, 16, 16))
    assert seen["shapes"] == (torch.Size([1, 16, 4, 4]), torch.Size([1, 16, 2, 4]))


def test_dilated_attention_module_inherits_causal():
    q, k, v = _qkv(dtype=torch.float64)
    att = DilatedAttention(W, R, causal=True)
    torch.testing.assert_close(att(q, k, v), dilated_attention_reference(q, k, v, W, R, causal=True))
    torch.testing.assert_close(att(q, k, v, is_causal=False), dilated_attention_reference(q, k, v, W, R))


def test_longnet_lm_runs_causal():
    torch.manual_seed(0)
    model = LongNetLM(50, 16, 2, 1, W, R).eval()
    tokens = torch.randint(0, 50, (1, 16))
    logits = model(tokens)
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 50
    torch.testing.assert_close(model(changed)[:, :-1], logits[:, :-1])


def test_pattern_object_with_dilation_rates_is_refused():
    from dilated_attn import DilationPattern

    q, k, v = _qkv()
    with pytest.raises(
        TypeError, match="dilation_rates=\\[4\\] must be None when segment_lengths is a DilationPattern"
    ):
        dilated_attention(q, k, v, DilationPattern([8], [1]), [4])


def test_pool_without_weak_references_is_refused_naming_pool():
    class SlottedPool:
        __slots__ = ()

        def acquire(self, *a):
            raise AssertionError

        def release(self, *a):
            raise AssertionError

        def stats(self):
            return {}

    q, k, v = _qkv()
    with pytest.raises(TypeError, match="pool=.* must support weak references"):
        dilated_attention(q, k, v, W, R, pool=SlottedPool())


def test_square_two_dimensional_attn_mask_is_ambiguous():
    q, k, v = (torch.randn(4, 4, 2, 8) for _ in range(3))
    with pytest.raises(ValueError, match="ambiguous with batch == seq == 4"):
        dilated_attention(q, k, v, [4], [1], attn_mask=torch.ones(4, 4, dtype=torch.bool).tril())


def test_module_with_a_backend_missing_a_required_option_is_refused_when_built():
    from dilated_attn import hookimpl
    from dilated_attn.registry import get_registry

    class Needs:
        @hookimpl
        def dilated_attn_register_attention(self, register):
            register("needs-x", lambda *a: None, options=("x",), requires=("x",), auto=False)

    registry = get_registry()
    name = registry.register(Needs(), name="needs-x-plugin")
    try:
        with pytest.raises(TypeError, match=r"backend='needs-x' requires the keyword arguments \['x'\]"):
            DilatedAttention(W, R, backend="needs-x")
        DilatedAttention(W, R, backend="needs-x", x=1)
    finally:
        registry.unregister(name)
