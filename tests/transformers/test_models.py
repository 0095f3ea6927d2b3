"""Tiny Llama, Qwen2 and Mistral models built from config with attn_implementation="dilated"."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("dilated_attn_transformers")

import dilated_attn_transformers  # noqa: E402, F401
from dilated_attn.testing import TOLERANCES, relative_error  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

VOCAB = 97
DENSE = {"segment_lengths": [64], "dilation_rates": [1]}
SPARSE = {"segment_lengths": [4, 8, 16], "dilation_rates": [1, 2, 4], "mode": "longnet"}

# The families and their K/V heads for 4 query heads: Llama plain, Qwen2 and Mistral grouped (GQA, MQA).
FAMILIES = {"llama": (LlamaConfig, 4), "qwen2": (Qwen2Config, 2), "mistral": (MistralConfig, 1)}


def _model(family: str, pattern: dict[str, Any] | None, dtype: torch.dtype = torch.float64, **config: Any):
    config_class, kv_heads = FAMILIES[family]
    settings = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 128,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": None,
    }
    if family == "mistral":
        settings["sliding_window"] = None
    cfg = config_class(**{**settings, **config})
    if pattern is not None:
        cfg.dilated_attention = pattern
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="dilated").to(dtype).eval()
    # Random init makes some logits large; a wider spread keeps greedy choices far from ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _tokens(b: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def _padded_batch(left: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 left-padded by ``left``, row 1 right-padded by 6, in a batch of length 19."""
    ids = _tokens(2, 19, seed=1)
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[0, :left] = 0
    mask[1, 13:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("other", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_dense_segment_equals_the_models_own_attention(
    family: str, other: str, dtype: torch.dtype
) -> None:
    model = _model(family, DENSE, dtype)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation(other)
    # eager gives left-padded query rows (which see no key) NaN, and the next layer's values carry it into
    # the real rows of that sequence; it is compared on right padding only.
    ids, mask = _padded_batch(left=4 if other == "sdpa" else 0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = reference(ids, attention_mask=mask).logits
        unpadded_ours = model(ids[:1, 4:]).logits
        unpadded_theirs = reference(ids[:1, 4:]).logits
    real = mask.bool()
    # eager takes its softmax in float32 whatever the dtype: float32's bound is the tightest it meets.
    tol = TOLERANCES[torch.float32 if other == "eager" else dtype][0]
    assert relative_error(ours[real], theirs[real]) <= tol
    assert relative_error(unpadded_ours, unpadded_theirs) <= tol


def _greedy_by_full_forwards(model: torch.nn.Module, ids: torch.Tensor, steps: int):
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            last = model(ids).logits[:, -1]
            logits.append(last)
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    return ids, torch.stack(logits, dim=1)


def _generate(model: Any, ids: torch.Tensor, steps: int, **kwargs: Any):
    out = model.generate(
        ids,
        max_new_tokens=steps,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=0,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_equals_argmax_over_full_forwards(family: str) -> None:
    model = _model(family, SPARSE)
    prompt = _tokens(2, 9, seed=2)
    sequences, logits = _generate(model, prompt, steps=14)
    expected, expected_logits = _greedy_by_full_forwards(model, prompt, steps=14)
    assert torch.equal(sequences, expected)
    # generate() hands back its logits in float32
    assert relative_error(logits, expected_logits) <= TOLERANCES[torch.float32][0]


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_chunks_equal_the_full_forward(family: str, chunk: int) -> None:
    model = _model(family, SPARSE)
    ids = _tokens(2, 23, seed=9)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(ids).logits
        pieces = [model(ids[:, :5], cache=cache, use_cache=True).logits]
        for start in range(5, 23, chunk):
            pieces.append(model(ids[:, start : start + chunk], cache=cache, use_cache=True).logits)
    assert cache.get_seq_length() == 23
    assert relative_error(torch.cat(pieces, dim=1), full) <= TOLERANCES[torch.float64][0]


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_generate_equals_each_prompt_alone(family: str) -> None:
    model = _model(family, SPARSE)
    short, long = _tokens(1, 6, seed=3), _tokens(1, 11, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    sequences, logits = _generate(model, batch, steps=10, attention_mask=mask)
    for row, prompt in enumerate((short, long)):
        alone, alone_logits = _generate(model, prompt, steps=10)
        assert torch.equal(sequences[row, 11:], alone[0, prompt.shape[1] :])
        assert relative_error(logits[row], alone_logits[0]) <= TOLERANCES[torch.float32][0]


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_forward_equals_unpadded(family: str) -> None:
    model = _model(family, SPARSE)
    ids, mask = _padded_batch()
    # generate()'s position ids: each token's index among its row's tokens (the default position ids,
    # 0, 1, ..., agree with them on right padding).
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, position_ids=positions).logits
        right_padded = model(ids, attention_mask=mask).logits
        left = model(ids[:1, 4:]).logits[0]
        right = model(ids[1:, :13]).logits[0]
    tol = TOLERANCES[torch.float64][0]
    assert relative_error(padded[0, 4:], left) <= tol
    assert relative_error(padded[1, :13], right) <= tol
    assert relative_error(right_padded[1, :13], right) <= tol


def test_training_gradients_equal_the_models_own_attention_with_one_dense_segment() -> None:
    model = _model("qwen2", DENSE).train()
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    ids, mask = _padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    for m in (model, reference):
        m(ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert ours.grad is not None and theirs.grad is not None, name
        assert relative_error(ours.grad, theirs.grad) <= TOLERANCES[torch.float64][1], name


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step(family: str) -> None:
    model = _model(family, SPARSE, torch.float32).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ids, mask = _padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    losses = []
    for _ in range(3):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        attention = model.model.layers[0].self_attn
        assert attention.q_proj.weight.grad.abs().sum() > 0  # type: ignore[union-attr]
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_attention_dropout_applies_in_training_only() -> None:
    model = _model("llama", SPARSE, torch.float32, attention_dropout=0.5)
    without = _model("llama", SPARSE, torch.float32, attention_dropout=0.0)
    ids = _tokens(2, 19, seed=5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, without(ids).logits)
        model.train()
        first, second = model(ids).logits, model(ids).logits
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, without(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_pattern_is_a_clear_error(family: str) -> None:
    model = _model(family, None)
    with pytest.raises(ValueError, match=r"needs config\.dilated_attention"):
        model(_tokens(1, 5, seed=6))


def test_invalid_pattern_is_a_clear_error() -> None:
    model = _model("llama", {"segment_lengths": [4, 8], "dilation_rates": [1, 16]})
    with pytest.raises(ValueError, match=r"config\.dilated_attention: dilation_rates\[1\]=16"):
        model(_tokens(1, 5, seed=6))


def test_sliding_window_is_refused_not_dropped() -> None:
    model = _model("mistral", SPARSE, sliding_window=8)
    with pytest.raises(ValueError, match="sliding"):
        model(_tokens(1, 12, seed=7))


def test_static_cache_is_refused() -> None:
    model = _model("llama", SPARSE)
    with pytest.raises(ValueError, match="DynamicCache"):
        model.generate(
            _tokens(1, 5, seed=8), max_new_tokens=2, do_sample=False, cache_implementation="static"
        )
