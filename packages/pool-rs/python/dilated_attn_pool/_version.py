"""The version handshake between this package's Python code and its compiled module."""

from __future__ import annotations

import importlib.metadata

# The installed distribution's version: maturin takes it from Cargo.toml, the crate version the compiled
# module also reports, so a compiled module left from another build of the sources is caught.
__version__ = importlib.metadata.version("dilated-attn-pool")


def check_compiled(compiled_version: str, expected_version: str = __version__) -> None:
    """Refuse a compiled ``_pool_rs`` built from another version of the sources."""
    if compiled_version != expected_version:
        raise ImportError(
            f"dilated_attn_pool {expected_version} found a compiled module dilated_attn_pool._pool_rs "
            f"of version {compiled_version}; they must match. Rebuild it: `maturin develop --release` "
            "in packages/pool-rs, or reinstall dilated-attn-pool"
        )
