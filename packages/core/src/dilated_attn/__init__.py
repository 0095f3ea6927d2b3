"""dilated-attn: exact LongNet dilated attention for PyTorch.

``dilated_attention(q, k, v, segment_lengths, dilation_rates)`` on ``(batch, seq, heads, head_dim)``
tensors, the modules ``DilatedAttention`` and ``MultiheadDilatedAttention``, a small ``LongNetLM``, and
a pluggy registry through which backends (ring, block-sparse, fused kernels, third-party) plug in.
"""

from dilated_attn._version import __version__
from dilated_attn.decoding import dilated_attention_with_kvcache
from dilated_attn.functional import dilated_attention
from dilated_attn.hookspecs import hookimpl
from dilated_attn.kvcache import DilatedKVCache, KVCacheBudgetError
from dilated_attn.models import LongNetLM
from dilated_attn.modules import DilatedAttention, MultiheadDilatedAttention
from dilated_attn.pattern import DilationPattern
from dilated_attn.registry import Capabilities, available_backends, available_pools, get_backend, get_pool
from dilated_attn.request import Request

__all__ = [
    "Capabilities",
    "Request",
    "DilatedAttention",
    "DilatedKVCache",
    "KVCacheBudgetError",
    "DilationPattern",
    "LongNetLM",
    "MultiheadDilatedAttention",
    "available_backends",
    "available_pools",
    "dilated_attention",
    "dilated_attention_with_kvcache",
    "get_backend",
    "get_pool",
    "hookimpl",
    "__version__",
]
