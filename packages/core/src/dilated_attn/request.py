"""What a backend is asked to compute, beside the tensors and the pattern: built once, trusted after.

The front door (:func:`dilated_attn.dilated_attention` and the modules) checks every argument and
builds one frozen :class:`Request`; the registry matches it against backends' capabilities and the
chosen backend runs it without checking anything again. A backend is a callable

    backend(q, k, v, pattern: DilationPattern, request: Request) -> (out, lse)

with ``q`` ``(b, n, h, d)``, ``k``/``v`` ``(b, n, h_kv, d)`` (``h_kv == h`` unless the backend declares
``gqa=True``), ``out`` ``(b, n, h, d)`` in the input dtype and ``lse`` ``(b, n, h)`` float32 (float64
for float64 inputs), ``-inf`` on rows with no key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import torch

from dilated_attn.pattern import DilationPattern


@dataclass(frozen=True)
class Request:
    """Checked arguments of one attention call (everything but the tensors and the pattern)."""

    device: torch.device
    dtype: torch.dtype
    batch: int
    seq_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mode: str
    causal: bool
    scale: float
    dropout_p: float = 0.0
    key_padding_mask: torch.Tensor | None = None
    needs_grad: bool = False
    pool: Any = None
    # Keyword arguments of one backend (``group=`` for ring, ``pattern=`` for block_sparse), checked
    # against the names it declares in its capabilities.
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def replace(self, **changes: Any) -> Request:
        """A copy with ``changes`` (composers adapt a request, e.g. to K/V repeated to every head)."""
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        fields.update(changes)
        return Request(**fields)


class AttentionBackend(Protocol):
    """The one contract every attention backend implements."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pattern: DilationPattern,
        request: Request,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
