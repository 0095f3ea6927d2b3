"""Modules and the LongNet model: shapes, GQA, padding, causality, gradients."""

from __future__ import annotations

import pytest
import torch
from dilated_attn import DilatedAttention, LongNetLM, MultiheadDilatedAttention
from dilated_attn.reference import dilated_attention_reference
from dilated_attn.testing import relative_error


def _manual(mha: MultiheadDilatedAttention, x: torch.Tensor, causal: bool, mask=None) -> torch.Tensor:
    """The module's computation spelt out with the float64 oracle."""
    b, n, _ = x.shape
    h, kvh, d = mha.num_heads, mha.num_kv_heads, mha.head_dim
    x64 = x.double()
    q = torch.nn.functional.linear(x64, mha.q_proj.weight.double(), mha.q_proj.bias.double()).view(b, n, h, d)
    k = torch.nn.functional.linear(x64, mha.k_proj.weight.double(), mha.k_proj.bias.double()).view(
        b, n, kvh, d
    )
    v = torch.nn.functional.linear(x64, mha.v_proj.weight.double(), mha.v_proj.bias.double()).view(
        b, n, kvh, d
    )
    k, v = k.repeat_interleave(h // kvh, 2), v.repeat_interleave(h // kvh, 2)
    pattern = mha.attention.pattern
    out = dilated_attention_reference(
        q, k, v, pattern, mode=mha.attention.mode, causal=causal, key_padding_mask=mask
    ).reshape(b, n, h * d)
    out = torch.nn.functional.layer_norm(
        out, (h * d,), mha.norm.weight.double(), mha.norm.bias.double(), mha.norm.eps
    )
    return torch.nn.functional.linear(out, mha.out_proj.weight.double(), mha.out_proj.bias.double())


@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_matches_oracle(num_kv_heads, causal):
    torch.manual_seed(0)
    mha = MultiheadDilatedAttention(32, 4, [8, 16], [1, 2], num_kv_heads=num_kv_heads)
    x = torch.randn(2, 37, 32)
    out, weights = mha(x, is_causal=causal)
    assert weights is None and out.shape == x.shape
    assert relative_error(out, _manual(mha, x, causal)) <= 1e-5


def test_key_padding_mask_keeps_padding_out():
    torch.manual_seed(1)
    mha = MultiheadDilatedAttention(16, 2, [8, 16], [1, 2])
    x = torch.randn(2, 24, 16)
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[1, 18:] = True
    out, _ = mha(x, key_padding_mask=mask)
    assert relative_error(out, _manual(mha, x, False, mask)) <= 1e-5
    changed = x.clone()
    changed[1, 18:] = torch.randn(6, 16)
    out2, _ = mha(changed, key_padding_mask=mask)
    torch.testing.assert_close(out2[1, :18], out[1, :18])


def test_module_init_and_errors():
    mha = MultiheadDilatedAttention(64, 8, [16], [1], gamma_init=0.5, bias=False, layer_norm=False)
    assert mha.q_proj.bias is None and mha.norm is None
    assert mha.v_proj.weight.std() < mha.q_proj.weight.std()
    with pytest.raises(ValueError, match="embed_dim=30 must be divisible by num_heads=4"):
        MultiheadDilatedAttention(30, 4, [8], [1])
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        MultiheadDilatedAttention(32, 4, [8], [1], num_kv_heads=3)
    with pytest.raises(ValueError, match=r"query.shape=\(1, 8, 16\) must be \(batch, seq, embed_dim=32\)"):
        MultiheadDilatedAttention(32, 4, [8], [1])(torch.randn(1, 8, 16))
    with pytest.raises(ValueError, match="dilation_rates"):
        MultiheadDilatedAttention(32, 4, [8], [16])


def test_dilated_attention_module():
    torch.manual_seed(2)
    attn = DilatedAttention([4, 8], [1, 2], causal=True)
    q = torch.randn(1, 20, 2, 8, requires_grad=True)
    out = attn(q, q, q)
    ref = dilated_attention_reference(
        q.detach().double(), q.detach().double(), q.detach().double(), [4, 8], [1, 2], causal=True
    )
    assert relative_error(out, ref) <= 1e-5
    assert "segment_lengths=[4, 8]" in repr(attn)


def test_longnet_lm_trains_and_is_causal():
    torch.manual_seed(3)
    model = LongNetLM(50, 32, 2, 4, [8, 16, 32], [1, 2, 4])
    tokens = torch.randint(0, 50, (2, 40))
    logits = model(tokens)
    assert logits.shape == (2, 40, 50)
    changed = tokens.clone()
    changed[:, 30:] = (changed[:, 30:] + 1) % 50
    torch.testing.assert_close(model(changed)[:, :30], logits[:, :30])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
