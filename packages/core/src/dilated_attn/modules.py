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
from dilated_attn.registry import get_registry
from dilated_attn.validation import check_bool, check_dropout, check_int, check_scale


def _check_backend(backend: object, options: dict[str, Any]) -> str:
    """A backend name whose declared options cover ``options`` (checked when the module is built)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend={backend!r} must be a backend name (str)")
    if backend == "auto":
        if options:
            raise TypeError(
                f"unexpected keyword arguments {sorted(options)} with backend='auto'; backend-specific "
                "options need the backend named (e.g. backend='ring', group=...)"
            )
        return backend
    caps = get_registry().attention(backend).capabilities
    unknown = sorted(set(options) - set(caps.options))
    if unknown:
        raise TypeError(
            f"unexpected keyword arguments {unknown} for backend={backend!r}; it takes "
            f"{sorted(caps.options) or 'none'}"
        )
    missing = [name for name in caps.requires if options.get(name) is None]
    if missing:
        raise TypeError(f"backend={backend!r} requires the keyword arguments {missing}")
    return backend


class DilatedAttention(nn.Module):
    """Dilated attention on ``(b, n, h, d)`` tensors with a fixed pattern and backend.

    ``causal`` is the default that ``forward(is_causal=None)`` inherits; ``forward(is_causal=True/False)``
    overrides it for one call. Extra keyword arguments go to the named backend (``pattern=`` for
    "block_sparse", ``group=`` for "ring") and must be options it declares.
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
        self.causal = check_bool("causal", causal)
        self.scale = scale if scale is None else check_scale(scale, 1)
        self.attention_dropout = check_dropout(attention_dropout)
        self.backend = _check_backend(backend, backend_kwargs)
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
        attn_mask: torch.Tensor | None = None,
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
        attn_mask: torch.Tensor | None = None,
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
        attn_mask: torch.Tensor | None = None,
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
        attn_mask: torch.Tensor | None = None,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``q`` ``(b, n, h, d)``, ``k, v`` ``(b, n, h_kv, d)`` -> ``(b, n, h, d)`` (and ``lse`` ``(b, n, h)``).

        ``is_causal=None`` uses the module's ``causal``.
        """
        return dilated_attention(
            q,
            k,
            v,
            self.pattern,
            mode=self.mode,
            causal=self.causal if is_causal is None else check_bool("is_causal", is_causal),
            scale=self.scale,
            dropout_p=self.attention_dropout if self.training else 0.0,
            return_lse=return_lse,
            backend=self.backend,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            **self.backend_kwargs,
        )

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={list(self.pattern.segment_lengths)}, "
            f"dilation_rates={list(self.pattern.dilation_rates)}, mode={self.mode!r}, "
            f"causal={self.causal}, backend={self.backend!r}"
        )


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated attention, following ``nn.MultiheadAttention`` where it can.

    Projections, MAGNETO's sub-LayerNorm before ``out_proj``, and grouped-query attention
    (``num_kv_heads < num_heads``: K/V keep their heads and backends that take grouped heads read
    them in place) around any registered attention backend named by ``backend``. ``causal`` is the
    default that ``forward(is_causal=None)`` inherits. ``batch_first=True`` (the default) takes
    ``(batch, seq, embed_dim)``; ``batch_first=False`` takes ``(seq, batch, embed_dim)`` like
    ``nn.MultiheadAttention``'s default.
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
        causal: bool = False,
        num_kv_heads: int | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **backend_kwargs: Any,
    ) -> None:
        super().__init__()
        embed_dim = check_int("embed_dim", embed_dim)
        num_heads = check_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        kv_heads = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads)
        if num_heads % kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads!r} must divide num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = kv_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = check_bool("batch_first", batch_first)
        self.gamma_init = gamma_init
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        bias = check_bool("bias", bias)
        kv_dim = kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.norm = (
            nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory)
            if check_bool("layer_norm", layer_norm)
            else None
        )
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.attention = DilatedAttention(
            segment_lengths,
            dilation_rates,
            mode=mode,
            causal=causal,
            attention_dropout=dropout,
            backend=backend,
            **backend_kwargs,
        )
        self.reset_parameters()

    @property
    def causal(self) -> bool:
        return self.attention.causal

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
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        *,
        is_causal: bool | None = None,
        cache: DilatedKVCache | None = None,
    ) -> tuple[torch.Tensor, None]:
        """``query`` ``(b, n, embed_dim)`` (``(n, b, embed_dim)`` when not batch_first; key/value default
        to it) -> ``(output of the same layout, None)``.

        ``key_padding_mask`` ``(b, n)`` bool marks keys (True) that are never attended; ``attn_mask``
        is accepted only as a boolean mask that drops whole keys (see ``dilated_attention``);
        ``is_causal=None`` uses the module's ``causal``. With ``cache`` (a ``DilatedKVCache`` of this
        module's pattern, mode, heads and head size) the tokens follow those already in it: causal
        decoding through ``dilated_attention_with_kvcache``.
        """
        if check_bool("need_weights", need_weights):
            raise ValueError("need_weights=True is not supported: dilated attention never forms the weights")
        if cache is not None:
            causal = self.causal if is_causal is None else check_bool("is_causal", is_causal)
            out = self._forward_cached(query, key, value, cache, causal, key_padding_mask, attn_mask)
            return out, None
        key = query if key is None else key
        value = key if value is None else value
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[-1] != self.embed_dim:
                layout = "batch, seq" if self.batch_first else "seq, batch"
                raise ValueError(
                    f"{name}.shape={tuple(t.shape)} must be ({layout}, embed_dim={self.embed_dim})"
                )
        if key.shape[:2] != query.shape[:2] or value.shape[:2] != key.shape[:2]:
            raise ValueError(
                f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} must "
                "share (batch, seq): dilated attention pairs positions segment by segment"
            )
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, n, _ = query.shape
        q = self.q_proj(query).view(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(key).view(b, n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(value).view(b, n, self.num_kv_heads, self.head_dim)
        out = self.attention(
            q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask
        )
        out = out.reshape(b, n, self.embed_dim)
        if self.norm is not None:
            out = self.norm(out)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _forward_cached(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        cache: DilatedKVCache,
        causal: bool,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        attention = self.attention
        if key is not None or value is not None:
            raise ValueError("cache= attends the tokens to themselves: pass query only (key=value=None)")
        if not causal or key_padding_mask is not None or attn_mask is not None:
            raise ValueError(
                f"cache= is causal decoding: is_causal={causal} must be True (or the module causal) and "
                "key_padding_mask and attn_mask None"
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
        if not self.batch_first:
            query = query.transpose(0, 1)
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
        out = self.out_proj(out)
        return out if self.batch_first else out.transpose(0, 1)
