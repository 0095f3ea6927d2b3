"""The handshake on what the Rust and Python ledgers share: constants, keys and refusal texts.

Core's ``dilated_attn.pool.ledger`` and ``dilated_attn.pool.cache_ledger`` are the one source; the
compiled module exports its own copies, and a difference means the two ledgers would report
different stats or refuse with different words, so the import stops.
"""

from __future__ import annotations

from types import ModuleType

from dilated_attn.pool import cache_ledger, ledger

# Each name, and the core module that defines it.
SHARED = {
    "STATS_KEYS": ledger,
    "EVENT_KINDS": ledger,
    "MIN_BLOCK_BYTES": ledger,
    "LARGE_BYTES": ledger,
    "ROUNDUP_DIVISIONS": ledger,
    "MAX_REQUEST_BYTES": ledger,
    "MAX_RESERVED_BYTES": ledger,
    "DEFAULT_EVENT_CAPACITY": ledger,
    "MAX_EVENT_CAPACITY": ledger,
    "REFUSAL_SAMPLES": ledger,
    "CACHE_STATS_KEYS": cache_ledger,
    "MAX_CACHE_BUDGET_BYTES": cache_ledger,
}

_MISSING = "<missing>"


def _plain(value: object) -> object:
    """Lists and tuples alike, so that a Rust ``Vec`` compares equal to a Python tuple."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(item) for item in value)
    return value


def check_shared(compiled: ModuleType, version: str) -> None:
    """Refuse a compiled module whose shared constants differ from core's, naming each one."""
    differ = []
    for name, core in SHARED.items():
        mine, theirs = _plain(getattr(compiled, name, _MISSING)), _plain(getattr(core, name))
        if mine != theirs:
            differ.append(f"{name}: compiled {mine!r} != {core.__name__}.{name} {theirs!r}")
    if differ:
        raise ImportError(
            f"dilated_attn_pool {version}'s compiled ledger disagrees with dilated-attn-core on "
            f"{', '.join(d.split(':')[0] for d in differ)} ({'; '.join(differ)}). The two ledgers must "
            "share these: install dilated-attn-core and dilated-attn-pool from the same release, or "
            "rebuild the module against this core (`maturin develop --release` in packages/pool-rs)"
        )
