"""The "dilated" attention function against the float64 oracle: padding, GQA, decoding rows, errors."""

from __future__ import annotations

import types
import zlib

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("dilated_attn_transformers")

from dilated_attn.reference import dilated_attention_reference  # noqa: E402
from dilated_attn.testing import TOLERANCES, relative_error  # noqa: E402
from dilated_attn_transformers import (  # noqa: E402
    DilatedMask,
    dilated_attention_config,
    dilated_attention_forward,
    dilated_mask,
)
from transformers.masking_utils import (  # noqa: E402
    bidirectional_mask_function,
    causal_mask_function,
    sliding_window_causal_mask_function,
)

PATTERN = {"segment_lengths": [4, 8, 16], "dilation_rates": [1, 2, 4]}


def _layer(**settings: object) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.config = types.SimpleNamespace(dilated_attention={**PATTERN, **settings})  # type: ignore[assignment]
    layer.is_causal = True  # type: ignore[assignment]
    return layer


def _padding(lengths: list[tuple[int, int]], n: int) -> torch.Tensor:
    """(b, n) bool, True = padding, from (left padding, tokens) per row; the rest is right padding."""
    padded = torch.ones(len(lengths), n, dtype=torch.bool)
    for row, (left, tokens) in enumerate(lengths):
        padded[row, left : left + tokens] = False
    return padded


def _expected(q, k, v, padded, t, mode, causal, scale):  # type: ignore[no-untyped-def]
    """The oracle on each row's tokens alone (positions 0, 1, ... among them), K/V repeated to the
    query heads, scattered back to the last ``t`` slots; padded query slots are 0."""
    b, h, n, d = q.shape
    groups = h // k.shape[1]
    out = torch.zeros(b, t, h, d, dtype=torch.float64)
    for row in range(b):
        keep = ~padded[row]
        ref_row = dilated_attention_reference(
            q[row : row + 1, :, keep].transpose(1, 2).double(),
            k[row : row + 1, :, keep].repeat_interleave(groups, dim=1).transpose(1, 2).double(),
            v[row : row + 1, :, keep].repeat_interleave(groups, dim=1).transpose(1, 2).double(),
            PATTERN["segment_lengths"],
            PATTERN["dilation_rates"],
            mode=mode,
            causal=causal,
            scale=scale,
        )[0]
        place = torch.cumsum(keep.long(), 0) - 1
        for i, s in enumerate(range(n - t, n)):
            if keep[s]:
                out[row, i] = ref_row[place[s]]
    return out


CASES = [
    # (lengths per row as (left padding, tokens), n, t, h, h_kv, mode, causal)
    ([(0, 23), (0, 23)], 23, 23, 4, 4, "longnet", True),
    ([(5, 18), (0, 23)], 23, 23, 4, 2, "longnet", True),
    ([(0, 17), (3, 19)], 23, 23, 4, 1, "head_groups", True),
    ([(0, 23), (6, 17)], 23, 23, 4, 2, "longnet", False),
    ([(0, 29), (0, 29)], 29, 1, 4, 2, "longnet", True),
    ([(4, 25), (0, 29)], 29, 1, 4, 4, "longnet", True),
    ([(7, 22), (0, 29)], 29, 5, 4, 2, "head_groups", True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_matches_oracle_on_each_rows_tokens(case: tuple, dtype: torch.dtype) -> None:  # type: ignore[type-arg]
    lengths, n, t, h, h_kv, mode, causal = case
    fwd_tol, grad_tol = TOLERANCES[dtype]
    g = torch.Generator().manual_seed(zlib.crc32(f"{case}/{dtype}".encode()))
    b, d = len(lengths), 8
    q_all = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h_kv, n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(b, h_kv, n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    q = q_all[:, :, n - t :].to(dtype).requires_grad_()
    padded = _padding(lengths, n)
    any_padding = bool(padded.any())
    mask = DilatedMask(key_padding_mask=padded if any_padding else None, causal=causal)
    scale = 0.3
    out, weights = dilated_attention_forward(_layer(mode=mode), q, k, v, mask, scaling=scale)
    assert weights is None and out.shape == (b, t, h, d) and out.dtype == dtype

    q64 = q_all.clone()
    q64[:, :, n - t :] = q.detach().double()
    q64.requires_grad_()
    k64, v64 = (x.detach().double().requires_grad_() for x in (k, v))
    ref = _expected(q64, k64, v64, padded, t, mode, causal, scale)
    assert relative_error(out, ref) <= fwd_tol
    assert torch.all(out.detach()[padded[:, n - t :]] == 0)

    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * grad.to(dtype)).sum().backward()
    (ref * grad).sum().backward()
    for ours, theirs in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert ours is not None and theirs is not None
        assert relative_error(ours, theirs[:, :, n - ours.shape[2] :]) <= grad_tol


def test_mask_keeps_padding_and_causality() -> None:
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    mask = dilated_mask(2, 5, 5, attention_mask=attention_mask)
    assert mask.causal and torch.equal(mask.key_padding_mask, attention_mask == 0)  # type: ignore[arg-type]
    mask = dilated_mask(
        2, 1, 5, q_offset=4, mask_function=bidirectional_mask_function, attention_mask=attention_mask
    )
    assert not mask.causal and mask.key_padding_mask is not None
    assert dilated_mask(2, 5, 5, attention_mask=torch.ones(2, 5)).key_padding_mask is None
    assert dilated_mask(2, 5, 5).key_padding_mask is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask_function": sliding_window_causal_mask_function(4)}, "plain causal or bidirectional"),
        ({"mask_function": lambda b, h, q, kv: kv <= q}, "plain causal or bidirectional"),
        ({"q_offset": torch.tensor(3)}, "DynamicCache"),
        ({"kv_length": 16}, "DynamicCache"),
        ({"kv_offset": 2, "kv_length": 5}, "DynamicCache"),
        ({"attention_mask": torch.ones(2, 7)}, r"must be \(batch, kv_length\)"),
    ],
)
def test_mask_refuses_what_it_cannot_honour(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    args = {"batch_size": 2, "q_length": 5, "kv_length": 5, "mask_function": causal_mask_function, **kwargs}
    with pytest.raises(ValueError, match=match):
        dilated_mask(**args)


@pytest.mark.parametrize(
    "value, error, match",
    [
        (None, ValueError, r"needs config\.dilated_attention"),
        ([4, 8], TypeError, r"config\.dilated_attention=\[4, 8\] must be a dict"),
        ({"segment_lengths": [4, 8]}, ValueError, r"lacks \['dilation_rates'\]"),
        ({**PATTERN, "heads": 4}, ValueError, r"unknown keys \['heads'\]"),
        ({"segment_lengths": [4, 8], "dilation_rates": [1]}, ValueError, "same length"),
        (
            {"segment_lengths": [4, 8], "dilation_rates": [1, 16]},
            ValueError,
            r"dilation_rates\[1\]=16 must be <=",
        ),
        ({"segment_lengths": [4, 8.0], "dilation_rates": [1, 2]}, TypeError, r"segment_lengths\[1\]=8.0"),
        ({**PATTERN, "mode": "groups"}, ValueError, r"\['mode'\]='groups' must be one of"),
        ({**PATTERN, "backend": 3}, TypeError, r"\['backend'\]=3 must be a backend name"),
    ],
)
def test_bad_config_is_a_clear_error(value: object, error: type, match: str) -> None:
    config = types.SimpleNamespace(dilated_attention=value)
    with pytest.raises(error, match=match) as info:
        dilated_attention_config(config)
    assert "config.dilated_attention" in str(info.value)


def test_config_defaults() -> None:
    settings = dilated_attention_config(types.SimpleNamespace(dilated_attention=PATTERN))
    assert settings.mode == "longnet" and settings.backend == "auto"
    assert settings.pattern.segment_lengths == (4, 8, 16)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sliding_window": 8}, ValueError, r"sliding_window=8 .*config\.sliding_window=None"),
        ({"softcap": 30.0}, ValueError, "soft-capping"),
        ({"cu_seq_lens_q": torch.tensor([0, 5])}, ValueError, "packed sequences"),
        ({"output_attentions": True}, ValueError, "never materialised"),
        ({"attention_mask": torch.ones(2, 1, 5, 5, dtype=torch.bool)}, TypeError, "cannot be honoured"),
    ],
)
def test_attention_refuses_what_it_cannot_honour(kwargs: dict, error: type, match: str) -> None:  # type: ignore[type-arg]
    q = k = v = torch.randn(2, 4, 5, 8)
    attention_mask = kwargs.pop("attention_mask", None)
    with pytest.raises(error, match=match):
        dilated_attention_forward(_layer(), q, k, v, attention_mask, **kwargs)


def test_backend_from_config_reaches_dilated_attention() -> None:
    q, k, v = (torch.randn(1, 4, 12, 8, dtype=torch.float64) for _ in range(3))
    mask = DilatedMask(key_padding_mask=None, causal=True)
    ours, _ = dilated_attention_forward(_layer(backend="reference"), q, k, v, mask)
    default, _ = dilated_attention_forward(_layer(), q, k, v, mask)
    assert relative_error(ours, default) <= TOLERANCES[torch.float64][0]
    with pytest.raises(Exception, match="no-such-backend"):
        dilated_attention_forward(_layer(backend="no-such-backend"), q, k, v, mask)


def test_ring_backend_refuses_cached_decoding() -> None:
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 9, 8), torch.randn(1, 4, 9, 8)
    with pytest.raises(ValueError, match=r"\['backend'\]='ring' .*cached decoding"):
        dilated_attention_forward(_layer(backend="ring"), q, k, v, None)


def test_decoding_rows_do_not_recompute_the_whole_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    # A causal call with t < n computes only its t rows, over the window their segments reach (the
    # full-sequence path is never taken); a non-causal one still runs the full attention.
    import dilated_attn_transformers.attention as attention

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the whole sequence was recomputed for a decoding step")

    seen = []
    real = attention.attention_at_positions

    def spy(q, k, v, pos_q, pos_k, *rest):  # type: ignore[no-untyped-def]
        seen.append((pos_q.tolist(), pos_k.min().item(), pos_k.max().item()))
        return real(q, k, v, pos_q, pos_k, *rest)

    monkeypatch.setattr(attention, "dilated_attention", forbidden)
    monkeypatch.setattr(attention, "attention_at_positions", spy)
    b, h, n, d = 1, 4, 40, 8
    q, k, v = (torch.randn(b, h, m, d) for m in (1, n, n))
    out, _ = dilated_attention_forward(_layer(), q, k, v, DilatedMask(key_padding_mask=None, causal=True))
    # Position 39 lies in segments [36, 40), [32, 40) and [32, 48) of w = 4, 8, 16: keys from 32 on.
    assert seen == [([39], 32, 39)] and out.shape == (b, 1, h, d)
    with pytest.raises(AssertionError, match="recomputed"):
        dilated_attention_forward(_layer(), q, k, v, DilatedMask(key_padding_mask=None, causal=False))
