"""``nn.Module`` wrappers over the functional: ``DilatedAttention`` and ``MultiheadDilatedAttention``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, overload

import torch
from torch import nn

from dilated_attn.decoding import dilated_attention_with_kvcache
from dilated_attn.functional import dilated_attention
from dilated_attn.kvcache import DilatedKVCache
from dilated_attn.pattern import DilationPattern, check_mode


class DilatedAttention(nn.Module):
    """Dilated attention on ``(b, n, h, d)`` tensors with a fixed pattern and backend.

    Extra keyword arguments go to the backend (e.g. ``pattern=`` for "block_sparse", ``group=`` for
    "ring").
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        mode: str = "longnet",
        causal: bool = False,
        scale: float | None = None,
        attention_dropout: float = 0.0,
        backend: str = "auto",
        **backend_kwargs: Any,
    ) -> None:
        super().__init__()
        self.pattern = DilationPattern(segment_lengths, dilation_rates)
        self.mode = check_mode(mode)
        self.causal = causal
        self.scale = scale
        self.attention_dropout = attention_dropout
        self.backend = backend
        self.backend_kwargs = backend_kwargs

    @overload
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool | None = None,
        key_padding_mask: torch.Tensor | None = None,
        return_lse: Literal[False] = False,
    ) -> torch.Tensor: ...

    @overload
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool | None = None,
        key_padding_mask: torch.Tensor | None = None,
        return_lse: Literal[True],
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool | None = None,
        key_padding_mask: torch.Tensor | None = None,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool | None = None,
        key_padding_mask: torch.Tensor | None = None,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``q, k, v`` ``(b, n, h, d)`` -> ``(b, n, h, d)`` (and ``lse`` ``(b, n, h)``)."""
        return dilated_attention(
            q,
            k,
            v,
            self.pattern,
            mode=self.mode,
            causal=self.causal if is_causal is None else is_causal,
            scale=self.scale,
            dropout_p=self.attention_dropout if self.training else 0.0,
            return_lse=return_lse,
            backend=self.backend,
            key_padding_mask=key_padding_mask,
            **self.backend_kwargs,
        )

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={list(self.pattern.segment_lengths)}, "
            f"dilation_rates={list(self.pattern.dilation_rates)}, mode={self.mode!r}, "
            f"causal={self.causal}, backend={self.backend!r}"
        )


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated attention, ``batch_first`` like ``nn.MultiheadAttention``.

    Projections, MAGNETO's sub-LayerNorm before ``out_proj``, and grouped-query attention
    (``num_kv_heads < num_heads``) around any registered attention backend named by ``backend``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        backend: str = "auto",
        mode: str = "longnet",
        num_kv_heads: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **backend_kwargs: Any,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if (
            isinstance(kv_heads, bool)
            or not isinstance(kv_heads, int)
            or kv_heads < 1
            or num_heads % kv_heads
        ):
            raise ValueError(
                f"num_kv_heads={num_kv_heads!r} must be a positive int dividing num_heads={num_heads}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = kv_heads
        self.head_dim = embed_dim // num_heads
        self.gamma_init = gamma_init
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        kv_dim = kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory) if layer_norm else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.attention = DilatedAttention(
            segment_lengths,
            dilation_rates,
            mode=mode,
            attention_dropout=dropout,
            backend=backend,
            **backend_kwargs,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # MAGNETO: unit gain on q/k, gamma on the value and output paths.
        nn.init.xavier_normal_(self.q_proj.weight, gain=1.0)
        nn.init.xavier_normal_(self.k_proj.weight, gain=1.0)
        nn.init.xavier_normal_(self.v_proj.weight, gain=self.gamma_init)
        nn.init.xavier_normal_(self.out_proj.weight, gain=self.gamma_init)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.norm is not None:
            self.norm.reset_parameters()

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        cache: DilatedKVCache | None = None,
    ) -> tuple[torch.Tensor, None]:
        """``query`` ``(b, n, embed_dim)`` (key/value default to it) -> ``((b, n, embed_dim), None)``.

        ``key_padding_mask`` ``(b, n)`` bool marks keys (True) that are never attended. With ``cache``
        (a ``DilatedKVCache`` of this module's pattern, mode, heads and head size), the ``n`` tokens
        follow those already in it: causal attention through ``dilated_attention_with_kvcache``.
        """
        if need_weights:
            raise ValueError("need_weights=True is not supported: dilated attention never forms the weights")
        if cache is not None:
            return self._forward_cached(query, key, value, cache, is_causal, key_padding_mask), None
        key = query if key is None else key
        value = key if value is None else value
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 3 or t.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"{name}.shape={tuple(t.shape)} must be (batch, seq, embed_dim={self.embed_dim})"
                )
        if key.shape[:2] != query.shape[:2] or value.shape[:2] != key.shape[:2]:
            raise ValueError(
                f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} must "
                "share (batch, seq): dilated attention pairs positions segment by segment"
            )
        b, n, _ = query.shape
        q = self.q_proj(query).view(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(key).view(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(value).view(b, n, self.num_kv_heads, self.head_dim)
        if self.num_kv_heads != self.num_heads:
            repeat = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(repeat, dim=2)
            v = v.repeat_interleave(repeat, dim=2)
        out = self.attention(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask)
        assert isinstance(out, torch.Tensor)
        out = out.reshape(b, n, self.embed_dim)
        if self.norm is not None:
            out = self.norm(out)
        return self.out_proj(out), None

    def _forward_cached(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        cache: DilatedKVCache,
        is_causal: bool,
        key_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        attention = self.attention
        if key is not None or value is not None:
            raise ValueError("cache= attends the tokens to themselves: pass query only (key=value=None)")
        if not is_causal or key_padding_mask is not None:
            raise ValueError(
                f"cache= is causal decoding: is_causal={is_causal} must be True and key_padding_mask None"
            )
        if self.training and attention.attention_dropout > 0:
            raise ValueError(
                f"cache= has no attention dropout: call eval() (dropout={attention.attention_dropout})"
            )
        if (
            cache.pattern != attention.pattern
            or cache.mode != attention.mode
            or (cache.num_query_heads, cache.num_heads, cache.head_dim)
            != (self.num_heads, self.num_kv_heads, self.head_dim)
        ):
            raise ValueError(
                f"cache={cache!r} must match this module: pattern {attention.pattern}, "
                f"mode={attention.mode!r}, num_query_heads={self.num_heads}, "
                f"num_heads={self.num_kv_heads}, head_dim={self.head_dim}"
            )
        if query.dim() != 3 or query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"query.shape={tuple(query.shape)} must be (batch, seq, embed_dim={self.embed_dim})"
            )
        b, n, _ = query.shape
        q = self.q_proj(query).view(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(query).view(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(query).view(b, n, self.num_kv_heads, self.head_dim)
        out = dilated_attention_with_kvcache(q, k, v, cache, scale=attention.scale)
        assert isinstance(out, torch.Tensor)
        out = out.reshape(b, n, self.embed_dim)
        if self.norm is not None:
            out = self.norm(out)
        return self.out_proj(out)
