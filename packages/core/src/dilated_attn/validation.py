"""Input checks done once, at the public boundary, with errors that name argument, value and rule."""

from __future__ import annotations

import math

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(
    q: object, k: object, v: object, *, key_padding_mask: object = None
) -> tuple[int, int, int, int]:
    """Check ``q, k, v`` are ``(b, n, h, d)`` tensors of one shape, float dtype and device.

    Returns ``(b, n, h, d)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} (rank {t.dim()}); it must have rank 4: (batch, seq, heads, head_dim)"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}.dtype={t.dtype} must be one of {_FLOAT_DTYPES}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name}.shape={tuple(t.shape)} must equal q.shape={tuple(q.shape)} "
                "(use MultiheadDilatedAttention(num_kv_heads=...) for grouped-query attention)"
            )
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype={t.dtype} must equal q.dtype={q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}.device={t.device} must equal q.device={q.device}")
    b, n, h, d = q.shape
    for dim_name, size in (("batch", b), ("seq", n), ("heads", h), ("head_dim", d)):
        if size < 1:
            raise ValueError(f"q.shape={tuple(q.shape)} has {dim_name}={size}; every dimension must be >= 1")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"key_padding_mask.dtype={key_padding_mask.dtype} must be torch.bool (True = padding)"
            )
        if tuple(key_padding_mask.shape) != (b, n):
            raise ValueError(
                f"key_padding_mask.shape={tuple(key_padding_mask.shape)} must be (batch, seq)=({b}, {n})"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(
                f"key_padding_mask.device={key_padding_mask.device} must equal q.device={q.device}"
            )
    return b, n, h, d


def check_scale(scale: object, head_dim: int) -> float:
    """``scale`` or its default ``head_dim ** -0.5``; must be a finite positive number."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale={scale!r} must be a float or None")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale={scale!r} must be a finite positive number")
    return float(scale)


def check_dropout(dropout_p: object) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p={dropout_p!r} must be a float")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p!r} must be in [0, 1)")
    return float(dropout_p)
