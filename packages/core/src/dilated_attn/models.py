"""``LongNetLM``: a small causal language model built from ``MultiheadDilatedAttention`` blocks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dilated_attn.kvcache import DilatedKVCache
from dilated_attn.modules import MultiheadDilatedAttention
from dilated_attn.pool import BufferPool


def _sinusoidal_positions(
    n: int,
    dim: int,
    device: torch.device,
    dtype: torch.dtype,
    start: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """``(n, dim)`` position codes of ``offset..offset+n-1``; with ``start`` ``(b,)``, ``(b, n, dim)``
    from there."""
    position = torch.arange(offset, offset + n, device=device, dtype=torch.float32)
    if start is not None:
        position = start.to(device=device, dtype=torch.float32)[:, None] + position
    position = position[..., None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(*position.shape[:-1], dim, device=device, dtype=torch.float32)
    table[..., 0::2] = torch.sin(position * freq)
    table[..., 1::2] = torch.cos(position * freq[: dim // 2])
    return table.to(dtype)


class LongNetBlock(nn.Module):
    """Pre-LayerNorm transformer block: dilated self-attention, then a GELU MLP."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(embed_dim)
        self.attn = MultiheadDilatedAttention(
            embed_dim, num_heads, segment_lengths, dilation_rates, dropout=dropout, **attention_kwargs
        )
        self.mlp_norm = nn.LayerNorm(embed_dim)
        hidden = int(embed_dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, cache: DilatedKVCache | None = None) -> torch.Tensor:
        """``x`` ``(b, n, embed_dim)`` -> same shape; with ``cache``, ``x`` follows the cached tokens."""
        x = x + self.attn(self.attn_norm(x), is_causal=True, cache=cache)[0]
        return x + self.mlp(self.mlp_norm(x))


class LongNetLM(nn.Module):
    """Token embedding, sinusoidal positions, ``num_layers`` causal LongNet blocks, tied output head."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        num_layers: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        if vocab_size < 1 or num_layers < 1:
            raise ValueError(f"vocab_size={vocab_size} and num_layers={num_layers} must both be positive")
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.blocks = nn.ModuleList(
            LongNetBlock(
                embed_dim,
                num_heads,
                segment_lengths,
                dilation_rates,
                mlp_ratio=mlp_ratio,
                dropout=dropout,
                **attention_kwargs,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        nn.init.normal_(self.embed.weight, std=embed_dim**-0.5)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: Sequence[DilatedKVCache] | None = None,
        *,
        position_offset: int = 0,
    ) -> torch.Tensor:
        """``tokens`` ``(b, n)`` int64 -> logits ``(b, n, vocab_size)``.

        With ``cache`` (one ``DilatedKVCache`` per layer, from ``new_cache``), ``tokens`` follow the
        tokens already cached and the caches advance by ``n``. ``position_offset``: the position of
        ``tokens[:, 0]`` in the sequence (positions ``offset .. offset + n - 1``), for a rank holding
        one chunk of a sequence split across ranks (attention ``backend="ring"``); the cache already
        knows where its tokens go, so the two are not combined.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens.shape={tuple(tokens.shape)} must be (batch, seq)")
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache holds {len(cache)} layers; the model has {len(self.blocks)}")
        if isinstance(position_offset, bool) or not isinstance(position_offset, int):
            raise TypeError(
                f"position_offset={position_offset!r} must be an int (got {type(position_offset).__name__})"
            )
        if position_offset < 0:
            raise ValueError(f"position_offset={position_offset} must be >= 0")
        if cache is not None and position_offset:
            raise ValueError(
                f"position_offset={position_offset} cannot be combined with cache=: the cached tokens "
                "set the positions of the new ones"
            )
        x = self.embed(tokens)
        start = None if cache is None else cache[0].length
        x = x + _sinusoidal_positions(tokens.shape[1], x.shape[-1], x.device, x.dtype, start, position_offset)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i])
        return self.norm(x) @ self.embed.weight.t()

    def new_cache(
        self, batch_size: int, *, max_length: int | None = None, pool: BufferPool | str = "auto"
    ) -> list[DilatedKVCache]:
        """One empty ``DilatedKVCache`` per layer, in the model's dtype and on its device."""
        weight = self.embed.weight
        caches = []
        for block in self.blocks:
            assert isinstance(block, LongNetBlock)
            attn = block.attn
            caches.append(
                DilatedKVCache(
                    attn.attention.pattern,
                    batch_size=batch_size,
                    num_heads=attn.num_kv_heads,
                    num_query_heads=attn.num_heads,
                    head_dim=attn.head_dim,
                    dtype=weight.dtype,
                    device=weight.device,
                    mode=attn.attention.mode,
                    max_length=max_length,
                    pool=pool,
                )
            )
        return caches

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        pool: BufferPool | str = "auto",
    ) -> torch.Tensor:
        """Continue each prompt of ``input_ids`` ``(b, n)`` by ``max_new_tokens`` tokens: ``(b, n + new)``.

        ``temperature=0`` picks the most likely token (greedy); above 0 it samples from
        ``softmax(logits / temperature)``, restricted to the ``top_k`` most likely tokens when given.
        The prompt is one chunked prefill; each new token is one cached decode step per layer.
        ``progress`` shows a tqdm bar (tqdm must be installed).
        """
        if input_ids.dim() != 2 or input_ids.shape[1] < 1 or input_ids.dtype != torch.int64:
            raise ValueError(
                f"input_ids shape={tuple(input_ids.shape)} dtype={input_ids.dtype} must be (batch, seq >= 1) int64"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature={temperature!r} must be a float >= 0 (0: greedy)")
        vocab = self.embed.num_embeddings
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 < top_k):
            raise ValueError(f"top_k={top_k!r} must be a positive int or None")
        if top_k is not None and temperature == 0:
            raise ValueError(f"top_k={top_k} needs sampling: pass temperature > 0 (0 is greedy)")
        steps = range(max_new_tokens)
        if progress:
            try:
                from tqdm.auto import tqdm
            except ImportError as exc:
                raise ImportError("progress=True needs tqdm: pip install tqdm") from exc
            steps = tqdm(steps, desc="generate", unit="token")
        b, n = input_ids.shape
        tokens = [input_ids]
        caches = self.new_cache(b, max_length=n + max_new_tokens, pool=pool)
        try:
            chunk = input_ids
            for _ in steps:
                logits = self(chunk, cache=caches)[:, -1].float()
                if temperature == 0:
                    chunk = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < vocab:
                        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    chunk = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
                tokens.append(chunk)
        finally:
            for cache in caches:
                cache.close()
        return torch.cat(tokens, dim=1)
