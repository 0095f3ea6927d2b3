"""Registers "ring" with ``dilated_attn`` through the same hook every backend uses."""

from __future__ import annotations

from collections.abc import Callable

import torch
from dilated_attn import hookimpl
from dilated_attn.pattern import DilationPattern
from dilated_attn.request import Request


def ring_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: DilationPattern, request: Request
) -> tuple[torch.Tensor, torch.Tensor]:
    """The "ring" backend: ``ring_dilated_attention`` on this rank's chunk; ``group=`` picks the group."""
    from dilated_attn_ring.functional import ring_dilated_attention

    return ring_dilated_attention(
        q,
        k,
        v,
        pattern,
        group=request.options.get("group"),
        mode=request.mode,
        causal=request.causal,
        scale=request.scale,
        return_lse=True,
    )


@hookimpl
def dilated_attn_register_attention(register: Callable[..., None]) -> None:
    """Register "ring": sequence-parallel exact dilated attention (used only when named)."""
    register(
        "ring",
        ring_backend,
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        distributed=True,
        auto=False,
        options=("group",),
        description="sequence-parallel over torch.distributed: local segments, P2P for shared ones",
    )
