"""dilated-attn-pool: the buffer pool's bookkeeping in Rust, behind ``dilated_attn.pool.BufferPool``.

``RustBufferPool(budget_bytes=None)`` behaves exactly as ``dilated_attn.pool.PythonBufferPool``
(same semantics, same ``stats()`` keys); installing this package registers it as pool "rust", and
its ``cache_ledger`` (the Rust ``CacheLedger``) then keeps the books of ``dilated_attn.cache``.
"""

from dilated_attn_pool import _pool_rs
from dilated_attn_pool._shared import check_shared
from dilated_attn_pool._version import __version__, check_compiled

check_compiled(_pool_rs.__version__)
check_shared(_pool_rs, __version__)

from dilated_attn_pool.pool import RustBufferPool  # noqa: E402  (only after the handshake)

__all__ = ["RustBufferPool", "__version__"]
