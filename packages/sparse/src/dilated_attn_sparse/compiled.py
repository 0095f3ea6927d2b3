"""``torch.compile`` once per shape: one private compiled copy of a function per cache key.

Dynamo keeps its compiled code, and its recompile limit (8 entries by default), on the function's
code object. Compiled shapes and patterns would share that budget if every caller compiled the same
function: past the limit, Dynamo silently runs the function eagerly, and eager FlexAttention
materialises the whole score matrix. A fresh code object per key gives each shape its own budget;
within one, patterns of one kind share a graph (their parameters are tensors), so the entries are
the kinds of pattern times grad / no-grad.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Hashable
from typing import Any

import torch

_compiled: dict[tuple[Callable[..., Any], Hashable, Any], Callable[..., Any]] = {}
_lock = threading.Lock()


def _private_copy(fn: Callable[..., Any]) -> types.FunctionType:
    if not isinstance(fn, types.FunctionType):
        raise TypeError(f"fn={fn!r} must be a Python function (its code object is copied)")
    copy = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    return copy


def compiled(
    fn: Callable[..., Any], key: Hashable, *, fullgraph: bool = True, backend: Any = "inductor"
) -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=False, fullgraph=fullgraph)``, built once per ``(fn, key, backend)``."""
    cache_key = (fn, key, backend)
    with _lock:
        found = _compiled.get(cache_key)
        if found is None:
            found = torch.compile(_private_copy(fn), backend=backend, dynamic=False, fullgraph=fullgraph)
            _compiled[cache_key] = found
    return found
