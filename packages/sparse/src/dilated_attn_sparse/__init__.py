"""dilated-attn-sparse: block-sparse attention on PyTorch FlexAttention.

``block_sparse_attention(q, k, v, pattern)`` on ``(batch, seq, heads, head_dim)`` tensors computes one
softmax per row over the keys a sparse pattern allows, skipping empty blocks. Patterns compose with
``|`` and ``&``. The "block_sparse" backend makes it available to ``dilated_attn`` as
``MultiheadDilatedAttention(..., backend="block_sparse", pattern=...)``.

Importing the package (or building patterns) loads no FlexAttention and no compiler stack:
:func:`block_sparse_attention` and the first block mask load them, so a program that installs the
package but never runs it pays nothing.
"""

import importlib.metadata
from typing import TYPE_CHECKING, Any

from dilated_attn_sparse.cache import BlockMaskCache, block_masks
from dilated_attn_sparse.patterns import (
    AllOf,
    AnyOf,
    DilatedBlocks,
    FromMaskMod,
    GlobalLocal,
    LocalWindow,
    RandomBlocks,
    SparsePattern,
    Strided,
    dilated_blocks,
    from_mask_mod,
    global_local,
    intersection,
    local_window,
    random_blocks,
    strided,
    union,
)
from dilated_attn_sparse.stats import SparsityStats, sparsity_stats

if TYPE_CHECKING:
    from dilated_attn_sparse.attention import block_sparse_attention

# The installed distribution's version, which the build took from the repository's VERSION file.
__version__ = importlib.metadata.version("dilated-attn-sparse")

__all__ = [
    "AllOf",
    "AnyOf",
    "BlockMaskCache",
    "DilatedBlocks",
    "FromMaskMod",
    "GlobalLocal",
    "LocalWindow",
    "RandomBlocks",
    "SparsePattern",
    "SparsityStats",
    "Strided",
    "block_masks",
    "block_sparse_attention",
    "dilated_blocks",
    "from_mask_mod",
    "global_local",
    "intersection",
    "local_window",
    "random_blocks",
    "sparsity_stats",
    "strided",
    "union",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # PEP 562: the attention module imports FlexAttention, so it loads on first use.
    if name == "block_sparse_attention":
        from dilated_attn_sparse.attention import block_sparse_attention

        return block_sparse_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
