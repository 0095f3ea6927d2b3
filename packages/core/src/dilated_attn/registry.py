"""The plugin registry: a typed facade over pluggy, resolved once into dicts.

The rest of the library asks ``get_backend("ring")`` or ``get_pool("rust")``; nothing outside this
module calls ``pm.hook.*``. Hooks run when the registry is built (or refreshed after a plugin is
added), never on a forward pass.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pluggy
import torch

from dilated_attn import hookspecs

ENTRY_POINT_GROUP = "dilated_attn"
LOAD_PLUGINS_ENV = "DILATED_ATTN_LOAD_PLUGINS"

_ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KNOWN_MODES = ("longnet", "head_groups")


@dataclass(frozen=True)
class Capabilities:
    """What an attention backend can run; ``backend="auto"`` matches inputs against it."""

    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = _ALL_DTYPES
    modes: tuple[str, ...] = _KNOWN_MODES
    causal: bool = True
    backward: bool = True
    distributed: bool = False
    key_padding_mask: bool = False
    dropout: bool = True
    # Names of keyword arguments the backend cannot run without (e.g. ``pattern``).
    requires: tuple[str, ...] = ()
    # Among the backends that fit, ``auto`` takes the highest priority.
    priority: int = 0
    auto: bool = True
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def mismatch(
        self, *, device_type: str, dtype: torch.dtype, mode: str, causal: bool, needs_grad: bool
    ) -> str | None:
        """Why these inputs do not fit, or ``None`` when they do."""
        if device_type not in self.devices:
            return f"device {device_type!r} not in {self.devices}"
        if dtype not in self.dtypes:
            return f"dtype {dtype} not in {self.dtypes}"
        if mode not in self.modes:
            return f"mode {mode!r} not in {self.modes}"
        if causal and not self.causal:
            return "causal attention not supported"
        if needs_grad and not self.backward:
            return "backward not supported"
        return None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "devices": list(self.devices),
            "dtypes": [str(d).removeprefix("torch.") for d in self.dtypes],
            "modes": list(self.modes),
            "causal": self.causal,
            "backward": self.backward,
            "distributed": self.distributed,
            "key_padding_mask": self.key_padding_mask,
            "dropout": self.dropout,
            "priority": self.priority,
        }
        if self.requires:
            out["requires"] = list(self.requires)
        out.update(self.extra)
        return out


_CAPABILITY_FIELDS = {
    "devices",
    "dtypes",
    "modes",
    "causal",
    "backward",
    "distributed",
    "key_padding_mask",
    "dropout",
    "requires",
    "priority",
    "auto",
}


def _capabilities(name: str, raw: Mapping[str, Any]) -> Capabilities:
    known = {k: v for k, v in raw.items() if k in _CAPABILITY_FIELDS}
    extra = {k: v for k, v in raw.items() if k not in _CAPABILITY_FIELDS}
    for key in ("devices", "dtypes", "modes", "requires"):
        if key in known:
            value = known[key]
            if isinstance(value, (str, torch.dtype)):
                value = (value,)
            known[key] = tuple(value)
    for mode in known.get("modes", ()):
        if mode not in _KNOWN_MODES:
            raise ValueError(
                f"backend {name!r}: capability modes={known['modes']!r} names unknown mode {mode!r}; "
                f"known modes are {_KNOWN_MODES}"
            )
    return Capabilities(**known, extra=MappingProxyType(extra))


@dataclass(frozen=True)
class PluginInfo:
    """Where a registration came from: the plugin's name, and its distribution when installed."""

    plugin: str
    distribution: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class AttentionBackend:
    """A registered attention implementation.

    ``fn(q, k, v, segment_lengths, dilation_rates, *, mode, causal, scale, dropout_p, return_lse,
    **kwargs)`` takes ``(b, n, h, d)`` tensors and returns ``out`` or ``(out, lse)``.
    """

    name: str
    fn: Callable[..., Any]
    capabilities: Capabilities
    source: PluginInfo


@dataclass(frozen=True)
class PoolFactory:
    """A registered buffer pool: ``factory(budget_bytes=None)`` returns a ``BufferPool``."""

    name: str
    factory: Callable[..., Any]
    capabilities: Mapping[str, Any]
    source: PluginInfo


class Registry:
    """Backends and pools, resolved once from a pluggy plugin manager."""

    def __init__(self, pm: pluggy.PluginManager, sources: Mapping[str, PluginInfo]) -> None:
        self._pm = pm
        self._sources = dict(sources)
        self._backends: dict[str, AttentionBackend] = {}
        self._pools: dict[str, PoolFactory] = {}
        self._resolve()

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        return self._pm

    def _source_of(self, plugin: object) -> PluginInfo:
        name = self._pm.get_name(plugin) or repr(plugin)
        return self._sources.get(name, PluginInfo(plugin=name))

    def _resolve(self) -> None:
        backends: dict[str, AttentionBackend] = {}
        pools: dict[str, PoolFactory] = {}
        hook = self._pm.hook

        for impl in hook.dilated_attn_register_attention.get_hookimpls():
            source = self._source_of(impl.plugin)

            def register_attention(
                name: str, fn: Callable[..., Any], _source: PluginInfo = source, **caps: Any
            ) -> None:
                _check_name("attention backend", name)
                if not callable(fn):
                    raise TypeError(f"attention backend {name!r}: fn={fn!r} must be callable")
                if name in backends:
                    raise ValueError(
                        f"attention backend {name!r} registered twice: by "
                        f"{backends[name].source.plugin!r} and by {_source.plugin!r}; names must be unique"
                    )
                backends[name] = AttentionBackend(name, fn, _capabilities(name, caps), _source)

            impl.function(register=register_attention)

        for impl in hook.dilated_attn_register_pool.get_hookimpls():
            source = self._source_of(impl.plugin)

            def register_pool(
                name: str, factory: Callable[..., Any], _source: PluginInfo = source, **caps: Any
            ) -> None:
                _check_name("pool", name)
                if name in pools:
                    raise ValueError(
                        f"pool {name!r} registered twice: by {pools[name].source.plugin!r} and by "
                        f"{_source.plugin!r}; names must be unique"
                    )
                pools[name] = PoolFactory(name, factory, MappingProxyType(dict(caps)), _source)

            impl.function(register=register_pool)

        self._backends = backends
        self._pools = pools

    def register(self, plugin: object, name: str | None = None) -> str:
        """Add a plugin object and re-resolve; returns the name to pass to :meth:`unregister`."""
        registered = self._pm.register(plugin, name=name)
        if registered is None:
            raise ValueError(f"plugin {name or plugin!r} is blocked or already registered")
        self._pm.check_pending()
        self._resolve()
        return registered

    def unregister(self, name: str) -> None:
        self._pm.unregister(name=name)
        self._resolve()

    # -- attention -------------------------------------------------------------------------------
    def backends(self) -> Mapping[str, AttentionBackend]:
        return MappingProxyType(self._backends)

    def attention(self, name: str) -> AttentionBackend:
        try:
            return self._backends[name]
        except KeyError:
            raise ValueError(
                f"backend={name!r} is not a registered attention backend; known backends: "
                f"{sorted(self._backends)} (or 'auto')"
            ) from None

    def select(
        self,
        *,
        device_type: str,
        dtype: torch.dtype,
        mode: str,
        causal: bool,
        needs_grad: bool,
        key_padding_mask: bool = False,
        dropout: bool = False,
    ) -> AttentionBackend:
        """The highest-priority backend that runs these inputs without extra arguments."""
        reasons = []
        best: AttentionBackend | None = None
        for backend in self._backends.values():
            caps = backend.capabilities
            if not caps.auto or caps.distributed or caps.requires:
                continue
            why = caps.mismatch(
                device_type=device_type, dtype=dtype, mode=mode, causal=causal, needs_grad=needs_grad
            )
            if why is None and key_padding_mask and not caps.key_padding_mask:
                why = "key_padding_mask not supported"
            if why is None and dropout and not caps.dropout:
                why = "dropout not supported"
            if why is not None:
                reasons.append(f"{backend.name}: {why}")
                continue
            if best is None or caps.priority > best.capabilities.priority:
                best = backend
        if best is None:
            raise ValueError(
                f"backend='auto' found no attention backend for device={device_type!r}, dtype={dtype}, "
                f"mode={mode!r}, causal={causal}: " + "; ".join(reasons)
            )
        return best

    # -- pools -----------------------------------------------------------------------------------
    def pools(self) -> Mapping[str, PoolFactory]:
        return MappingProxyType(self._pools)

    def pool(self, name: str) -> PoolFactory:
        try:
            return self._pools[name]
        except KeyError:
            raise ValueError(
                f"pool={name!r} is not a registered buffer pool; known pools: {sorted(self._pools)}"
            ) from None

    def default_pool(self) -> PoolFactory:
        """The registered pool with the highest ``priority`` capability ("rust" when installed)."""
        if not self._pools:
            raise ValueError("no buffer pool is registered")
        return max(self._pools.values(), key=lambda p: p.capabilities.get("priority", 0))


def _check_name(kind: str, name: object) -> None:
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"{kind} name={name!r} must be a non-empty string other than 'auto'")


def _allowed_plugins() -> set[str] | None:
    raw = os.environ.get(LOAD_PLUGINS_ENV)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def build_registry(*, autoload: bool = True) -> Registry:
    """Build a registry: built-in backends, then entry-point plugins allowed by the environment.

    ``DILATED_ATTN_LOAD_PLUGINS`` unset loads every installed plugin; set, it is a comma-separated
    allow-list of entry-point names (empty: none). Built-ins always load.
    """
    from dilated_attn import backends as builtin

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    sources: dict[str, PluginInfo] = {}
    core_version = _version_of("dilated-attn-core")
    pm.register(builtin, name="core")
    sources["core"] = PluginInfo("core", "dilated-attn-core", core_version)
    if autoload:
        allowed = _allowed_plugins()
        for ep in _entry_points():
            if allowed is not None and ep.name not in allowed:
                continue
            if pm.has_plugin(ep.name):
                continue
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
            dist = ep.dist
            sources[ep.name] = PluginInfo(
                ep.name, dist.name if dist else None, dist.version if dist else None
            )
    pm.check_pending()
    return Registry(pm, sources)


def _version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


_registry: Registry | None = None
_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    if _registry is None:
        with _lock:
            if _registry is None:
                _registry = build_registry()
    return _registry


def reset_registry() -> None:
    """Forget the process-wide registry; the next use rebuilds it (tests, changed environment)."""
    global _registry
    with _lock:
        _registry = None


def available_backends() -> list[str]:
    """Names of the registered attention backends."""
    return sorted(get_registry().backends())


def get_backend(name: str) -> AttentionBackend:
    """The attention backend called ``name``; a ``ValueError`` lists the known names."""
    return get_registry().attention(name)


def available_pools() -> list[str]:
    """Names of the registered buffer pools."""
    return sorted(get_registry().pools())


def get_pool(name: str = "auto") -> PoolFactory:
    """The buffer pool factory called ``name``; ``"auto"`` takes the highest-priority pool."""
    registry = get_registry()
    return registry.default_pool() if name == "auto" else registry.pool(name)
