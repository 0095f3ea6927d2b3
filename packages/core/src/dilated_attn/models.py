"""``LongNetLM``: a small causal language model built from ``MultiheadDilatedAttention`` blocks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dilated_attn.modules import MultiheadDilatedAttention


def _sinusoidal_positions(n: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    position = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(b, n, embed_dim)`` -> same shape."""
        x = x + self.attn(self.attn_norm(x), is_causal=True)[0]
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

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(b, n)`` int64 -> logits ``(b, n, vocab_size)``."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens.shape={tuple(tokens.shape)} must be (batch, seq)")
        x = self.embed(tokens)
        x = x + _sinusoidal_positions(tokens.shape[1], x.shape[-1], x.device, x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()
