"""The plugin registry: a typed facade over pluggy, resolved once into dicts.

The rest of the library asks ``get_backend("ring")`` or ``get_pool("rust")``; nothing outside this
module calls ``pm.hook.*``. Hooks run when the registry is built (or refreshed after a plugin is
added), never on a forward pass.

A broken plugin never breaks the library: an entry point that fails to import, a hook that raises, a
misspelt hook, an invalid registration or a name taken by another plugin makes that plugin (all its
registrations) skipped with one :class:`PluginWarning` naming the entry point, its distribution and
the error; ``failures()`` and ``python -m dilated_attn plugins`` list it. Built-ins always load.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import numbers
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pluggy
import torch

from dilated_attn import hookspecs
from dilated_attn.pattern import MODES
from dilated_attn.request import AttentionBackend as BackendFn
from dilated_attn.request import Request

ENTRY_POINT_GROUP = "dilated_attn"
LOAD_PLUGINS_ENV = "DILATED_ATTN_LOAD_PLUGINS"
CORE_PLUGIN = "core"

_ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_NO_LIMIT = 2**31 - 1


class PluginWarning(UserWarning):
    """A plugin could not be loaded or registered, and was skipped."""


class RegistrationError(ValueError):
    """A registration broke a rule (unknown capability, bad value, taken name)."""


@dataclass(frozen=True)
class Capabilities:
    """What an attention backend can run; ``backend="auto"`` matches requests against it.

    ``options``: keyword arguments the backend takes beyond the common ones (``group`` for ring);
    ``requires``: those it cannot run without. Among the backends that fit a request, ``auto``
    takes the highest ``priority``; backends with ``auto=False`` or ``distributed=True`` are used
    only when named.
    """

    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = _ALL_DTYPES
    modes: tuple[str, ...] = MODES
    head_dims: tuple[int, int] = (1, _NO_LIMIT)
    causal: bool = True
    backward: bool = True
    dropout: bool = False
    key_padding_mask: bool = False
    pool: bool = False
    gqa: bool = False
    distributed: bool = False
    auto: bool = True
    priority: int = 0
    options: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def build(cls, owner: str, raw: Mapping[str, Any]) -> Capabilities:
        """Capabilities from a plugin's keywords; unknown or ill-typed ones raise naming ``owner``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise RegistrationError(
                f"{owner}: unknown capabilities {unknown}; known are {sorted(names - {'extra'})} "
                "(free-form metadata goes under extra={...})"
            )
        values = dict(raw)
        for key in ("devices", "modes", "options", "requires"):
            if key in values:
                value = values[key]
                value = (value,) if isinstance(value, str) else tuple(value)
                if not all(isinstance(x, str) for x in value):
                    raise RegistrationError(f"{owner}: capability {key}={raw[key]!r} must be strings")
                values[key] = value
        if "dtypes" in values:
            value = values["dtypes"]
            value = (value,) if isinstance(value, torch.dtype) else tuple(value)
            if not all(isinstance(x, torch.dtype) for x in value):
                raise RegistrationError(f"{owner}: capability dtypes={raw['dtypes']!r} must be torch.dtypes")
            values["dtypes"] = value
        for mode in values.get("modes", ()):
            if mode not in MODES:
                raise RegistrationError(
                    f"{owner}: capability modes names unknown mode {mode!r}; known: {MODES}"
                )
        if "head_dims" in values:
            value = tuple(values["head_dims"])
            if (
                len(value) != 2
                or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in value)
                or not 1 <= value[0] <= value[1]
            ):
                raise RegistrationError(
                    f"{owner}: capability head_dims={raw['head_dims']!r} must be (lowest, highest) ints, 1 <= lo <= hi"
                )
            values["head_dims"] = (int(value[0]), int(value[1]))
        for key in (
            "causal",
            "backward",
            "dropout",
            "key_padding_mask",
            "pool",
            "gqa",
            "distributed",
            "auto",
        ):
            if key in values and not isinstance(values[key], bool):
                raise RegistrationError(f"{owner}: capability {key}={values[key]!r} must be a bool")
        if "priority" in values:
            p = values["priority"]
            if isinstance(p, bool) or not isinstance(p, numbers.Integral):
                raise RegistrationError(f"{owner}: capability priority={p!r} must be an int")
            values["priority"] = int(p)
        if "description" in values and not isinstance(values["description"], str):
            raise RegistrationError(f"{owner}: capability description must be a str")
        if "extra" in values:
            if not isinstance(values["extra"], Mapping):
                raise RegistrationError(f"{owner}: capability extra={values['extra']!r} must be a mapping")
            values["extra"] = MappingProxyType(dict(values["extra"]))
        missing = sorted(set(values.get("requires", ())) - set(values.get("options", ())))
        if missing:
            raise RegistrationError(f"{owner}: requires={missing} must also be listed in options")
        return cls(**values)

    def mismatch(self, request: Request) -> str | None:
        """Why this backend cannot run ``request``, or ``None`` when it can."""
        if request.device.type not in self.devices:
            return f"device {request.device.type!r} not in {self.devices}"
        if request.dtype not in self.dtypes:
            return f"dtype {request.dtype} not in {self.dtypes}"
        if request.mode not in self.modes:
            return f"mode {request.mode!r} not in {self.modes}"
        lo, hi = self.head_dims
        if not lo <= request.head_dim <= hi:
            return f"head_dim {request.head_dim} outside [{lo}, {hi}]"
        if request.causal and not self.causal:
            return "causal attention not supported"
        if request.needs_grad and not self.backward:
            return "backward not supported"
        if request.dropout_p > 0.0 and not self.dropout:
            return f"dropout_p={request.dropout_p} not supported (it must be 0)"
        if request.key_padding_mask is not None and not self.key_padding_mask:
            return "key_padding_mask not supported"
        if request.pool is not None and not self.pool:
            return "pool= not supported"
        unknown = sorted(set(request.options) - set(self.options))
        if unknown:
            return f"keyword arguments {unknown} not taken (it takes {sorted(self.options)})"
        missing = [name for name in self.requires if request.options.get(name) is None]
        if missing:
            return f"keyword arguments {missing} required"
        return None

    def as_dict(self) -> dict[str, Any]:
        lo, hi = self.head_dims
        out: dict[str, Any] = {
            "devices": list(self.devices),
            "dtypes": [str(d).removeprefix("torch.") for d in self.dtypes],
            "modes": list(self.modes),
            "head_dims": [lo, hi] if hi != _NO_LIMIT else [lo, None],
            "causal": self.causal,
            "backward": self.backward,
            "dropout": self.dropout,
            "key_padding_mask": self.key_padding_mask,
            "pool": self.pool,
            "gqa": self.gqa,
            "distributed": self.distributed,
            "auto": self.auto,
            "priority": self.priority,
        }
        if self.options:
            out["options"] = list(self.options)
        if self.requires:
            out["requires"] = list(self.requires)
        if self.description:
            out["description"] = self.description
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class PluginInfo:
    """Where a registration came from: the plugin's name, and its distribution when installed."""

    plugin: str
    distribution: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that was skipped: where it came from, at which step, and the error."""

    source: PluginInfo
    stage: str
    error: str


@dataclass(frozen=True)
class AttentionBackend:
    """A registered attention implementation: ``fn(q, k, v, pattern, request) -> (out, lse)``."""

    name: str
    fn: BackendFn
    capabilities: Capabilities
    source: PluginInfo


@dataclass(frozen=True)
class PoolFactory:
    """A registered buffer pool: ``factory(budget_bytes=None)`` (or calling this) returns a ``BufferPool``."""

    name: str
    factory: Callable[..., Any]
    capabilities: Mapping[str, Any]
    source: PluginInfo

    def __call__(self, budget_bytes: int | None = None) -> Any:
        return self.factory(budget_bytes=budget_bytes)


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not name or name == "auto":
        raise RegistrationError(f"{kind} name={name!r} must be a non-empty string other than 'auto'")
    return name


class Registry:
    """Backends and pools, resolved once from a pluggy plugin manager."""

    def __init__(
        self,
        pm: pluggy.PluginManager,
        sources: Mapping[str, PluginInfo],
        failures: list[PluginFailure] | None = None,
    ) -> None:
        self._pm = pm
        self._sources = dict(sources)
        self._load_failures = list(failures or [])
        self._failures: list[PluginFailure] = []
        self._backends: dict[str, AttentionBackend] = {}
        self._pools: dict[str, PoolFactory] = {}
        # register/unregister mutate the plugin manager and re-resolve as one step; readers see the
        # old or the new tables (each swapped in whole), never a half-built one.
        self._mutex = threading.RLock()
        self._resolve()

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        return self._pm

    def _source_of(self, plugin: object) -> PluginInfo:
        name = self._pm.get_name(plugin) or repr(plugin)
        return self._sources.get(name, PluginInfo(plugin=name))

    def _impls(self, hook: Any) -> list[Any]:
        # Built-ins first, so a plugin can only take a built-in name by saying replace=True.
        impls = list(hook.get_hookimpls())
        return sorted(impls, key=lambda impl: self._pm.get_name(impl.plugin) != CORE_PLUGIN)

    def _resolve(self) -> None:
        backends: dict[str, AttentionBackend] = {}
        pools: dict[str, PoolFactory] = {}
        failures = list(self._load_failures)
        builtin_names: set[tuple[str, str]] = set()
        hook = self._pm.hook
        plugins: dict[str, tuple[PluginInfo, list[Any], list[Any]]] = {}
        for kind, hookcaller in (
            ("attention", hook.dilated_attn_register_attention),
            ("pool", hook.dilated_attn_register_pool),
        ):
            for impl in self._impls(hookcaller):
                source = self._source_of(impl.plugin)
                entry = plugins.setdefault(source.plugin, (source, [], []))
                (entry[1] if kind == "attention" else entry[2]).append(impl)
        order = sorted(plugins, key=lambda name: name != CORE_PLUGIN)
        for plugin_name in order:
            source, attention_impls, pool_impls = plugins[plugin_name]
            is_core = plugin_name == CORE_PLUGIN
            try:
                mine_b, mine_p = _collect(source, attention_impls, pool_impls, backends, pools, builtin_names)
            except Exception as exc:
                if is_core:
                    raise
                failures.append(_warn(source, "register", exc))
                continue
            backends.update(mine_b)
            pools.update(mine_p)
            if is_core:
                builtin_names.update(("attention backend", n) for n in mine_b)
                builtin_names.update(("pool", n) for n in mine_p)
        self._backends = backends
        self._pools = pools
        self._failures = failures

    def register(self, plugin: object, name: str | None = None) -> str:
        """Add a plugin object and re-resolve; returns the name to pass to :meth:`unregister`.

        Unlike entry-point plugins, a plugin added here that breaks a rule raises (the caller is
        right there to see it) and is not kept. Thread-safe.
        """
        with self._mutex:
            return self._register(plugin, name)

    def _register(self, plugin: object, name: str | None) -> str:
        registered = self._pm.register(plugin, name=name)
        if registered is None:
            raise ValueError(f"plugin {name or plugin!r} is blocked or already registered")
        try:
            self._pm.check_pending()
            before = len(self._failures)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PluginWarning)  # raised below instead
                self._resolve()
            if len(self._failures) > before:
                raise RegistrationError(self._failures[-1].error)
        except Exception:
            self._pm.unregister(name=registered)
            self._resolve()
            raise
        return registered

    def unregister(self, name: str) -> None:
        """Remove a plugin added by :meth:`register` and re-resolve. Thread-safe."""
        with self._mutex:
            self._pm.unregister(name=name)
            self._resolve()

    def failures(self) -> list[PluginFailure]:
        """Plugins that were skipped, with the step that failed and the error."""
        return list(self._failures)

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

    def select(self, request: Request) -> AttentionBackend:
        """The highest-priority backend that runs ``request`` (never one that would then refuse it)."""
        reasons = []
        best: AttentionBackend | None = None
        for backend in self._backends.values():
            caps = backend.capabilities
            if not caps.auto or caps.distributed:
                continue
            why = caps.mismatch(request)
            if why is not None:
                reasons.append(f"{backend.name}: {why}")
                continue
            if best is None or caps.priority > best.capabilities.priority:
                best = backend
        if best is None:
            raise ValueError(
                f"backend='auto' found no attention backend for device={request.device.type!r}, "
                f"dtype={request.dtype}, mode={request.mode!r}, head_dim={request.head_dim}, "
                f"causal={request.causal}: " + "; ".join(reasons)
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


def _collect(
    source: PluginInfo,
    attention_impls: list[Any],
    pool_impls: list[Any],
    backends: Mapping[str, AttentionBackend],
    pools: Mapping[str, PoolFactory],
    builtin_names: set[tuple[str, str]],
) -> tuple[dict[str, AttentionBackend], dict[str, PoolFactory]]:
    """Run one plugin's hooks; its registrations, or the first rule it broke as an exception."""
    mine_b: dict[str, AttentionBackend] = {}
    mine_p: dict[str, PoolFactory] = {}

    def register_attention(name: str, fn: Any, *, replace: bool = False, **caps: Any) -> None:
        _check_name("attention backend", name)
        owner = f"attention backend {name!r} of plugin {source.plugin!r}"
        if not callable(fn):
            raise RegistrationError(f"{owner}: fn={fn!r} must be callable")
        _check_taken("attention backend", name, replace, source, backends, mine_b, builtin_names)
        mine_b[name] = AttentionBackend(name, fn, Capabilities.build(owner, caps), source)

    def register_pool(name: str, factory: Any, *, replace: bool = False, **caps: Any) -> None:
        _check_name("pool", name)
        owner = f"pool {name!r} of plugin {source.plugin!r}"
        if not callable(factory):
            raise RegistrationError(f"{owner}: factory must be callable")
        priority = caps.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, numbers.Integral):
            raise RegistrationError(f"{owner}: priority={priority!r} must be an int")
        _check_taken("pool", name, replace, source, pools, mine_p, builtin_names)
        mine_p[name] = PoolFactory(name, factory, MappingProxyType(dict(caps)), source)

    for impl in attention_impls:
        impl.function(register=register_attention)
    for impl in pool_impls:
        impl.function(register=register_pool)
    return mine_b, mine_p


def _check_taken(
    kind: str,
    name: str,
    replace: object,
    source: PluginInfo,
    taken: Mapping[str, Any],
    mine: Mapping[str, Any],
    builtin_names: set[tuple[str, str]],
) -> None:
    if not isinstance(replace, bool):
        raise RegistrationError(
            f"{kind} {name!r} of plugin {source.plugin!r}: replace={replace!r} must be a bool"
        )
    if name in mine:
        raise RegistrationError(f"{kind} {name!r} registered twice by plugin {source.plugin!r}")
    if name in taken and not replace:
        owner = taken[name].source.plugin
        what = "a built-in" if (kind, name) in builtin_names else f"already registered by plugin {owner!r}"
        raise RegistrationError(
            f"{kind} {name!r} of plugin {source.plugin!r} is {what}; pass replace=True to replace it"
        )


def _describe(source: PluginInfo) -> str:
    dist = f"{source.distribution} {source.version}" if source.distribution else "no distribution"
    return f"plugin {source.plugin!r} ({dist})"


def _warn(source: PluginInfo, stage: str, exc: BaseException) -> PluginFailure:
    error = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"dilated_attn: {_describe(source)} skipped: {stage} failed: {error}", PluginWarning, stacklevel=3
    )
    return PluginFailure(source, stage, error)


def _allowed_plugins() -> set[str] | None:
    raw = os.environ.get(LOAD_PLUGINS_ENV)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _info(ep: importlib.metadata.EntryPoint) -> PluginInfo:
    dist = ep.dist
    return PluginInfo(ep.name, dist.name if dist else None, dist.version if dist else None)


def build_registry(*, autoload: bool = True) -> Registry:
    """Build a registry: built-in backends, then entry-point plugins allowed by the environment.

    ``DILATED_ATTN_LOAD_PLUGINS`` unset loads every installed plugin; set, it is a comma-separated
    allow-list of entry-point names (empty: none); names that match no entry point are reported.
    Built-ins always load. A plugin that fails is skipped with a :class:`PluginWarning`.
    """
    from dilated_attn import backends as builtin

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    sources: dict[str, PluginInfo] = {}
    failures: list[PluginFailure] = []
    pm.register(builtin, name=CORE_PLUGIN)
    sources[CORE_PLUGIN] = PluginInfo(CORE_PLUGIN, "dilated-attn-core", _version_of("dilated-attn-core"))
    if autoload:
        allowed = _allowed_plugins()
        eps = _entry_points()
        if allowed:
            for name in sorted(allowed - {ep.name for ep in eps}):
                failures.append(
                    _warn(
                        PluginInfo(name),
                        "lookup",
                        LookupError(
                            f"{LOAD_PLUGINS_ENV} names {name!r}, which matches no installed entry point in "
                            f"group {ENTRY_POINT_GROUP!r}"
                        ),
                    )
                )
        for ep in eps:
            if allowed is not None and ep.name not in allowed:
                continue
            info = _info(ep)
            if pm.has_plugin(ep.name):
                taken = (
                    "reserved for the built-ins" if ep.name == CORE_PLUGIN else f"taken by {sources[ep.name]}"
                )
                failures.append(_warn(info, "load", ValueError(f"entry point name {ep.name!r} is {taken}")))
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                failures.append(_warn(info, f"import of {ep.value!r}", exc))
                continue
            try:
                pm.register(plugin, name=ep.name)
            except Exception as exc:
                failures.append(_warn(info, "hook validation", exc))
                continue
            sources[ep.name] = info
    while True:
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or repr(exc.plugin)
            if name == CORE_PLUGIN:
                raise
            failures.append(_warn(sources.get(name, PluginInfo(name)), "hook validation", exc))
            pm.unregister(plugin=exc.plugin)
    return Registry(pm, sources, failures)


def _version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


_registry: Registry | None = None
_lock = threading.Lock()


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    registry = _registry
    if registry is None:
        registry = _build_shared()
    return registry


def _build_shared() -> Registry:
    global _registry
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
