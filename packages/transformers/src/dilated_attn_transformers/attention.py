"""The ``"dilated"`` entry of transformers' ``AttentionInterface``.

transformers calls it as ``fn(module, query, key, value, attention_mask, scaling=, dropout=, **kwargs)``
with ``(b, h, n, d)`` tensors, the ``DilatedMask`` built by ``dilated_attn_transformers.masking`` and the
model's cache already applied (``key``/``value`` hold every position so far, the ``t`` queries are the
last ``t`` of them), and expects ``(attn_output (b, t, h, d), None)``.

Positions. A token's place in the dilation pattern is its index among its row's non-padded tokens, the
same number ``generate()`` gives it as ``position_ids``: each row's tokens are moved to the front, in
order, before the call and moved back after it, so a left- or right-padded prompt computes exactly what
the same prompt unpadded does. Padded query rows output 0.

Decoding. Causal dilated attention is prefix-consistent and each output row depends on its own query
only, so ``t`` new queries over ``n`` cached keys are rows ``[n - t, n)`` of the attention over length
``n``. A causal call with ``t < n`` (a decoding step, a later prefill chunk) computes just those rows:
each query over the keys of its segments (at most the longest segment before it), with the
multiplicity bias of SPEC 1a (``dilated_attn.decoding.attention_at_positions``), so a step costs the
pattern's window, not the whole sequence. The keys still come from the model's own ``DynamicCache``,
which holds every position; ``dilated_attn.DilatedKVCache`` (only the keys the pattern can still reach)
is not wired into transformers' cache classes.
"""

from __future__ import annotations

from typing import Any

import torch
from dilated_attn import DilationPattern, dilated_attention
from dilated_attn.decoding import attention_at_positions, window_start

from dilated_attn_transformers.config import CONFIG_KEY, dilated_attention_config
from dilated_attn_transformers.masking import DilatedMask

# Keywords of other attention implementations that change which keys a query sees or how scores are
# formed; the dilation pattern cannot apply them, so a non-None value is refused rather than dropped.
_REFUSED = {
    "sliding_window": "set config.sliding_window=None: the dilation pattern decides the keys of each query",
    "softcap": "attention logit soft-capping is not supported by dilated attention",
    "position_bias": "an additive position bias is not supported by dilated attention",
    "s_aux": "attention sinks are not supported by dilated attention",
    "cu_seq_lens_q": "packed sequences are not supported: pass one sequence per row with an attention_mask",
    "cu_seq_lens_k": "packed sequences are not supported: pass one sequence per row with an attention_mask",
}


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, i]]`` for ``x`` of shape ``(b, n, h, d)`` and ``index`` of shape ``(b, t)``."""
    return x.gather(1, index[:, :, None, None].expand(-1, -1, *x.shape[2:]))


def dilated_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: DilatedMask | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Dilated attention for one transformers attention layer.

    Args:
        module: the attention layer; ``module.config.dilated_attention`` holds the pattern.
        query: ``(b, h, t, d)``, the last ``t`` positions.
        key, value: ``(b, h_kv, n, d)`` with ``h_kv`` dividing ``h``, every position from 0.
        attention_mask: the ``DilatedMask`` of ``masking.dilated_mask``, or None (no padding; causal
            taken from ``is_causal`` or ``module.is_causal``).
        scaling: score scale (default ``d ** -0.5``).
        dropout: dropout on attention probabilities (transformers passes 0 outside training).

    Returns:
        ``(out, None)`` with ``out`` ``(b, t, h, d)`` in the input dtype.
    """
    settings = dilated_attention_config(module.config)
    for name, why in _REFUSED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}={kwargs[name]!r} with attn_implementation='dilated': {why}")
    if kwargs.get("output_attentions"):
        raise ValueError(
            "output_attentions=True with attn_implementation='dilated': the attention weights are never "
            "materialised; use attn_implementation='eager' to inspect them"
        )
    if attention_mask is not None and not isinstance(attention_mask, DilatedMask):
        raise TypeError(
            f"attention_mask of type {type(attention_mask).__name__} cannot be honoured by "
            "attn_implementation='dilated': pass the 2D attention_mask (1 = token, 0 = padding) to the model, "
            "which turns it into the mask this implementation reads"
        )
    if kwargs.get("is_causal") is not None:
        causal = bool(kwargs["is_causal"])
    elif attention_mask is not None:
        causal = attention_mask.causal
    else:
        causal = bool(getattr(module, "is_causal", True))
    padded = attention_mask.key_padding_mask if attention_mask is not None else None

    b, h, t, d = query.shape
    h_kv, n = key.shape[1], key.shape[2]
    if h % h_kv != 0:
        raise ValueError(f"key has {h_kv} heads, which must divide the {h} query heads")
    if t > n:
        raise ValueError(f"query has {t} positions but key only {n}: the keys must include the queries'")
    if t < n and settings.backend == "ring":
        raise ValueError(
            f"config.{CONFIG_KEY}['backend']='ring' runs sequence-parallel training and prefill; cached "
            "decoding (generate) runs on one device: use the default backend there"
        )
    # Grouped K/V heads go through as they are: dilated_attention takes h_kv heads dividing h.
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    def attend(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padded: torch.Tensor | None
    ) -> torch.Tensor:
        return dilated_attention(
            q,
            k,
            v,
            settings.pattern,
            mode=settings.mode,
            causal=causal,
            scale=scaling,
            dropout_p=dropout,
            backend=settings.backend,
            key_padding_mask=padded,
        )

    if t < n and causal and not dropout:
        return _last_rows(q, k, v, padded, settings.pattern, settings.mode, scaling), None
    if padded is None:
        if t == n:
            return attend(q, k, v, None), None
        placed = q.new_zeros(b, n, h, d)
        placed[:, n - t :] = q
        return attend(placed, k, v, None)[:, n - t :], None

    # Each row's tokens first, in order (a stable sort of the padding flags), then its padding.
    order = torch.argsort(padded.to(torch.int8), dim=1, stable=True)
    slot = torch.argsort(order, dim=1)[:, n - t :]
    if t == n:
        placed = _gather_rows(q, order)
    else:
        placed = q.new_zeros(b, n, h, d).scatter(1, slot[:, :, None, None].expand(-1, -1, h, d), q)
    out = attend(placed, _gather_rows(k, order), _gather_rows(v, order), padded.gather(1, order))
    out = _gather_rows(out, slot)
    return out.masked_fill(padded[:, n - t :, None, None], 0.0), None


def _last_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    padded: torch.Tensor | None,
    pattern: DilationPattern,
    mode: str,
    scale: float | None,
) -> torch.Tensor:
    """Causal attention of the last ``t`` positions only: ``q`` ``(b, t, h, d)`` over ``k, v``
    ``(b, n, h_kv, d)``. Each row's tokens are numbered among its non-padded ones; padded queries give 0."""
    b, t, h, d = q.shape
    n = k.shape[1]
    scale = d**-0.5 if scale is None else float(scale)
    out = q.new_zeros(b, t, h, d)
    for row in range(b):
        if padded is None or not bool(padded[row].any()):
            # Unpadded: positions are indices, the window a slice (a view, no gather).
            pos_q = torch.arange(n - t, n, device=q.device)
            first = window_start(pattern, n - t)
            queries: torch.Tensor | slice = slice(None)
            keys: torch.Tensor | slice = slice(first, n)
            count = n - first
        else:
            keep = ~padded[row]
            queries = keep[n - t :].nonzero().squeeze(1)  # which of the t slots hold tokens
            if queries.numel() == 0:
                continue
            place = torch.cumsum(keep.long(), 0) - 1  # a token's position among its row's tokens
            pos_q = place[n - t + queries]
            first = window_start(pattern, int(pos_q.min()))
            keys = keep.nonzero().squeeze(1)[first : int(pos_q.max()) + 1]  # raw indices, in order
            count = keys.numel()
        pos_k = torch.arange(first, first + count, device=q.device)
        o, _ = attention_at_positions(
            q[row, queries].transpose(0, 1),
            k[row, keys].transpose(0, 1),
            v[row, keys].transpose(0, 1),
            pos_q,
            pos_k,
            pattern,
            mode,
            scale,
        )
        out[row, queries] = o.transpose(0, 1).to(q.dtype)
    return out
