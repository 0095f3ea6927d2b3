"""Which of its indices ``(b, h, q_idx, kv_idx)`` a mask predicate reads, found by tracing it.

A block mask built once for every sequence (or every head) is exact only for a predicate that
ignores the batch index (or the head index). User predicates are opaque functions, so rather than
trust a docstring, the predicate is traced once per device as FlexAttention calls it (``vmap`` over
scalar index tensors) and the graph says which arguments feed the result.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ARGUMENTS = ("b", "h", "q_idx", "kv_idx")


@functools.lru_cache(maxsize=256)
def arguments_read(fn: MaskMod, device: torch.device) -> frozenset[str] | None:
    """The names in :data:`ARGUMENTS` that ``fn``'s result depends on through its graph, or ``None``
    (with a warning, once) when ``fn`` cannot be traced.

    Reading an index counts even when the result ends up independent of it (``h * 0``): the answer
    errs towards building more masks, never fewer.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    indices = [torch.zeros(2, dtype=torch.int32, device=device) for _ in ARGUMENTS]
    try:
        graph = make_fx(torch.vmap(fn))(*indices).graph
    except Exception as error:  # noqa: BLE001 - whatever stops the trace, callers take every extent
        warnings.warn(
            f"mask predicate {fn!r} could not be traced to see which indices it reads ({error}); "
            "its block masks are built for every sequence and head",
            stacklevel=2,
        )
        return None
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    return frozenset(name for name, node in zip(ARGUMENTS, placeholders, strict=True) if node.users)
