"""The version handshake between this package's Python code and its compiled module."""

from __future__ import annotations

# Must equal the crate version in Cargo.toml, which maturin also makes the distribution's version.
__version__ = "0.1.0"


def check_compiled(compiled_version: str, expected_version: str = __version__) -> None:
    """Refuse a compiled ``_pool_rs`` built from another version of the sources."""
    if compiled_version != expected_version:
        raise ImportError(
            f"dilated_attn_pool {expected_version} found a compiled module dilated_attn_pool._pool_rs "
            f"of version {compiled_version}; they must match. Rebuild it: `maturin develop --release` "
            "in packages/pool-rs, or reinstall dilated-attn-pool"
        )
