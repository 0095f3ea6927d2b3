"""Fused Triton kernels for dilated attention, as the custom ops behind the "triton" backend.

Importing this package imports Triton; the backend (``dilated_attn.backends.triton``) imports it on
its first call only.
"""

from dilated_attn.kernels.op import DTYPES, MAX_HEAD_DIM, MIN_HEAD_DIM, triton_bwd, triton_fwd

__all__ = ["DTYPES", "MAX_HEAD_DIM", "MIN_HEAD_DIM", "triton_bwd", "triton_fwd"]
