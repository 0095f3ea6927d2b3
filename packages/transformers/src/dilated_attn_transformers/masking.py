"""The ``"dilated"`` entry of transformers' ``AttentionMaskInterface``.

The dilation pattern decides which keys a query sees, so the mask only has to carry what the pattern
cannot know: which key slots are padding, and whether attention is causal. transformers hands the mask
function the 2D ``attention_mask`` (1 = token, 0 = padding) and a mask function; this keeps the first as
a key-padding mask and accepts only the plain causal and bidirectional mask functions, refusing the rest
(sliding windows, chunked attention, packed sequences, custom overlays) instead of dropping them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

from dilated_attn_transformers.config import CONFIG_KEY


@dataclass(frozen=True)
class DilatedMask:
    """What the ``"dilated"`` attention function needs from the model's mask.

    Attributes:
        key_padding_mask: ``(b, kv_length)`` bool, True marks padding; None when no slot is padding.
        causal: queries see only keys at positions ``<=`` their own.
    """

    key_padding_mask: torch.Tensor | None
    causal: bool


def dilated_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> DilatedMask:
    """Build the ``DilatedMask`` for one forward (transformers calls this once per mask type).

    Raises:
        ValueError: for a mask pattern the dilation pattern cannot honour, or a cache that does not hold
            every key from position 0 (the queries must be the last ``q_length`` of ``kv_length`` keys).
    """
    if mask_function is causal_mask_function:
        causal = True
    elif mask_function is bidirectional_mask_function:
        causal = False
    else:
        raise ValueError(
            f"mask_function={getattr(mask_function, '__qualname__', mask_function)!r}: the model asks for a "
            "mask other than plain causal or bidirectional attention (a sliding window, chunked attention, "
            f"packed sequences or a custom overlay); with attn_implementation='dilated' config.{CONFIG_KEY} "
            "decides the keys of each query and cannot apply it. Turn it off in the config "
            "(e.g. sliding_window=None, use_sliding_window=False) or pass unpacked sequences"
        )
    if isinstance(q_offset, torch.Tensor) or kv_offset != 0 or q_offset + q_length != kv_length:
        raise ValueError(
            f"attn_implementation='dilated' needs a cache that holds every key from position 0, such as "
            f"DynamicCache (the queries must be the last q_length of kv_length keys); got q_length={q_length}, "
            f"q_offset={q_offset}, kv_length={kv_length}, kv_offset={kv_offset}"
        )
    if attention_mask is None:
        return DilatedMask(key_padding_mask=None, causal=causal)
    if attention_mask.shape != (batch_size, kv_length):
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} must be (batch, kv_length) = "
            f"({batch_size}, {kv_length}): 1 for tokens, 0 for padding"
        )
    padded = ~attention_mask.to(torch.bool)
    # Checked once per forward rather than in every layer: most batches have no padding at all.
    return DilatedMask(key_padding_mask=padded if bool(padded.any()) else None, causal=causal)
