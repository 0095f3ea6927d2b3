"""Registers "ring" with ``dilated_attn`` through the same hook every backend uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from dilated_attn import hookimpl


def ring_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    mode: str,
    causal: bool,
    scale: float | None,
    dropout_p: float,
    return_lse: bool,
    group: Any = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The "ring" backend: ``ring_dilated_attention`` on this rank's chunk; ``group=`` picks the group."""
    from dilated_attn_ring.functional import ring_dilated_attention

    if dropout_p != 0.0:
        raise ValueError(f"dropout_p={dropout_p} is not supported by backend='ring' (it must be 0)")
    return ring_dilated_attention(
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        group=group,
        mode=mode,
        causal=causal,
        scale=scale,
        return_lse=return_lse,
    )


@hookimpl
def dilated_attn_register_attention(register: Callable[..., None]) -> None:
    """Register "ring": sequence-parallel exact dilated attention (never picked by ``auto``)."""
    register(
        "ring",
        ring_backend,
        devices=("cpu", "cuda"),
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        distributed=True,
        auto=False,
        description="sequence-parallel over torch.distributed: local segments, P2P for shared ones",
    )
