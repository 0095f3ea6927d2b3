"""Hook specifications: how plugins add attention backends and buffer pools.

A plugin is a module (or object) with functions decorated by :data:`hookimpl`, exposed through the
``dilated_attn`` entry-point group::

    [project.entry-points.dilated_attn]
    my_backend = "my_package.plugin"
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT_NAME = "dilated_attn"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

RegisterFn = Callable[..., None]


@hookspec
def dilated_attn_register_attention(register: RegisterFn) -> None:
    """Register attention backends: ``register(name, fn, **capabilities)``."""


@hookspec
def dilated_attn_register_pool(register: RegisterFn) -> None:
    """Register buffer pools: ``register(name, factory, **capabilities)``."""


__all__ = [
    "PROJECT_NAME",
    "hookspec",
    "hookimpl",
    "dilated_attn_register_attention",
    "dilated_attn_register_pool",
]
