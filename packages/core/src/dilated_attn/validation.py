"""Input checks done once, at the public boundary, with errors that name argument, value and rule.

Backends never call these: they receive a :class:`dilated_attn.request.Request` built from checked
arguments and trust it.
"""

from __future__ import annotations

import math
import numbers
import weakref

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Scores are ``scale * q.k`` in float32: a scale beyond this turns ordinary inputs into inf - inf.
MAX_SCALE = 1e6


def check_bool(name: str, value: object) -> bool:
    """A real bool (``numpy.bool_`` too); strings, ints, ``None`` and tensors are refused."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    raise TypeError(f"{name}={value!r} must be a bool (True or False), got {type(value).__name__}")


def check_int(name: str, value: object, *, minimum: int = 1) -> int:
    """An int (numpy ints too, not bools) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return int(value)


def check_causal(causal: object, is_causal: object) -> bool:
    """``causal`` and ``is_causal`` (PyTorch's name) are one flag: either may be given, or both if equal."""
    given = {
        name: check_bool(name, value)
        for name, value in (("causal", causal), ("is_causal", is_causal))
        if value is not None
    }
    if len(set(given.values())) > 1:
        raise ValueError(
            f"causal={causal!r} and is_causal={is_causal!r} disagree; they are the same flag: pass one"
        )
    return next(iter(given.values()), False)


def check_qkv(
    q: object, k: object, v: object, *, enable_gqa: object = None
) -> tuple[int, int, int, int, int]:
    """Check ``q`` ``(b, n, h, d)`` and ``k, v`` ``(b, n, h_kv, d)`` of one float dtype and device.

    ``h_kv`` must divide ``h`` (grouped-query attention, inferred from the shapes as flash-attn does);
    ``enable_gqa=False`` demands ``h_kv == h``. Returns ``(b, n, h, h_kv, d)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    gqa = None if enable_gqa is None else check_bool("enable_gqa", enable_gqa)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} (rank {t.dim()}); it must have rank 4: "
                "(batch, seq, heads, head_dim)"
            )
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}.dtype={t.dtype} must be one of {_FLOAT_DTYPES}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype={t.dtype} must equal q.dtype={q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}.device={t.device} must equal q.device={q.device}")
    b, n, h, d = q.shape
    if k.shape[0] != b or k.shape[1] != n or k.shape[3] != d:
        raise ValueError(
            f"k.shape={tuple(k.shape)} must equal q.shape={tuple(q.shape)} except in the heads "
            "dimension (grouped-query attention)"
        )
    if v.shape != k.shape:
        raise ValueError(f"v.shape={tuple(v.shape)} must equal k.shape={tuple(k.shape)}")
    for dim_name, size in (("batch", b), ("seq", n), ("heads", h), ("head_dim", d)):
        if size < 1:
            raise ValueError(f"q.shape={tuple(q.shape)} has {dim_name}={size}; every dimension must be >= 1")
    h_kv = k.shape[2]
    if h_kv < 1 or h % h_kv:
        raise ValueError(
            f"k.shape={tuple(k.shape)} has {h_kv} heads; the key/value heads must divide the "
            f"{h} query heads (grouped-query attention)"
        )
    if gqa is False and h_kv != h:
        raise ValueError(
            f"k has {h_kv} heads and q has {h}, but grouped-query attention is off (enable_gqa=False): "
            "pass K/V with the heads of q"
        )
    return b, n, h, h_kv, d


def check_key_padding_mask(mask: object, b: int, n: int, device: torch.device) -> torch.Tensor | None:
    """``(b, n)`` bool on the inputs' device, True marking keys that are never attended."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask.dtype={mask.dtype} must be torch.bool (True = padding)")
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"key_padding_mask.shape={tuple(mask.shape)} must be (batch, seq)=({b}, {n})")
    if mask.device != device:
        raise ValueError(f"key_padding_mask.device={mask.device} must equal q.device={device}")
    return mask


def attn_mask_as_padding(attn_mask: object, b: int, n: int, device: torch.device) -> torch.Tensor | None:
    """PyTorch's boolean ``attn_mask`` (True = may attend) shaped like a key mask -> a key padding mask.

    Dilated attention has its own sparsity, so only masks that keep or drop whole keys fit:
    ``(b, n)``, ``(b, 1, 1, n)`` or ``(1, 1, 1, n)`` booleans.
    """
    if attn_mask is None:
        return None
    rule = (
        "dilated attention takes only boolean masks that drop whole keys, shaped (batch, seq), "
        "(batch, 1, 1, seq) or (1, 1, 1, seq) with True = attend; for padding pass "
        "key_padding_mask=(batch, seq) bool with True = padded"
    )
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a bool tensor, got {type(attn_mask).__name__}: {rule}")
    if attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask.dtype={attn_mask.dtype} is not supported: {rule}")
    shape = tuple(attn_mask.shape)
    if shape == (b, n) and b == n:
        # PyTorch's 2-D attn_mask is (L, S): with batch == seq the shape cannot say which it is.
        raise ValueError(f"attn_mask.shape={shape} is ambiguous with batch == seq == {n}: {rule}")
    if shape == (b, n):
        keep = attn_mask
    elif len(shape) == 4 and shape[1:3] == (1, 1) and shape[3] == n and shape[0] in (1, b):
        keep = attn_mask.reshape(shape[0], n).expand(b, n)
    else:
        raise ValueError(f"attn_mask.shape={shape} is not supported: {rule}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask.device={attn_mask.device} must equal q.device={device}")
    return ~keep


def check_scale(scale: object, head_dim: int) -> float:
    """``scale`` or its default ``head_dim ** -0.5``; a finite number in ``(0, MAX_SCALE]``."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale={scale!r} must be a float or None")
    value = float(scale)
    if not math.isfinite(value) or value <= 0 or value > MAX_SCALE:
        raise ValueError(f"scale={scale!r} must be a finite positive number, at most {MAX_SCALE:g}")
    return value


def check_dropout(dropout_p: object) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p={dropout_p!r} must be a float")
    value = float(dropout_p)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"dropout_p={dropout_p!r} must be in [0, 1)")
    return value


def check_pool(pool: object) -> object:
    """``None`` or an object with the ``BufferPool`` protocol (not a factory, not a name)."""
    if pool is None:
        return None
    if all(callable(getattr(pool, name, None)) for name in ("acquire", "release", "stats")):
        try:
            weakref.ref(pool)
        except TypeError:
            raise TypeError(
                f"pool={pool!r} must support weak references (the library never keeps a pool alive); "
                f"{type(pool).__name__} defines __slots__ without '__weakref__'"
            ) from None
        return pool
    if hasattr(pool, "factory"):
        raise TypeError(
            f"pool={pool!r} is a pool factory; call it for a pool: pool=get_pool('auto').factory()"
        )
    raise TypeError(
        f"pool={pool!r} must be a dilated_attn.pool.BufferPool (with acquire/release/stats), "
        f"got {type(pool).__name__}"
    )
