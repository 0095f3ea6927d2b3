"""The "reference" backend: the dense float64 oracle, results cast back to the input dtype."""

from __future__ import annotations

import torch

from dilated_attn.pattern import DilationPattern
from dilated_attn.reference import dilated_attention_reference
from dilated_attn.request import Request


def reference_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: DilationPattern, request: Request
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 attention with the ``log c`` bias; O(h n^2) memory, for checks at small sizes."""
    out, lse = dilated_attention_reference(
        q,
        k,
        v,
        pattern,
        mode=request.mode,
        causal=request.causal,
        scale=request.scale,
        return_lse=True,
        key_padding_mask=request.key_padding_mask,
    )
    return out.to(q.dtype), lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
