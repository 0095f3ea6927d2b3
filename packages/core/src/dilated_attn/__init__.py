"""dilated-attn: exact LongNet dilated attention for PyTorch."""

from dilated_attn.hookspecs import hookimpl
from dilated_attn.pattern import DilationPattern
from dilated_attn.registry import available_backends, available_pools, get_backend, get_pool

__version__ = "0.1.0"

__all__ = [
    "DilationPattern",
    "available_backends",
    "available_pools",
    "get_backend",
    "get_pool",
    "hookimpl",
    "__version__",
]
