"""Checks of the sparse package's own arguments; tensors are checked by ``dilated_attn.validation``."""

from __future__ import annotations

import numbers
import sys
import typing
from collections.abc import Mapping
from typing import Any

# The smallest block the default FlexAttention tiles (128 x 128 on CUDA) fit in; a clamped block
# size never goes below it, so clamping never asks the kernels for a smaller tile than the default.
_MIN_CLAMPED_BLOCK = 128
# FlexAttention reads these prefixes as "forward only" / "backward only" versions of an option.
_OPTION_PREFIXES = ("fwd_", "bwd_")


def check_block_size(block_size: object) -> int:
    """``block_size`` must be a positive power of 2 (FlexAttention tiles blocks by powers of 2)."""
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise TypeError(f"block_size={block_size!r} must be an int (got {type(block_size).__name__})")
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size} must be a positive power of 2")
    return int(block_size)


def clamp_block_size(block_size: int, seq_len: int) -> int:
    """The block FlexAttention gets: ``block_size``, capped at one block covering the sequence.

    FlexAttention pads the sequence to a whole block and evaluates the mask on the padded square,
    so a block far beyond the sequence only costs memory (``block_size ** 2`` entries). Capped at the
    sequence rounded up to a power of 2 (at least 128), one block still covers every token.
    """
    covering = max(_MIN_CLAMPED_BLOCK, 1 << (seq_len - 1).bit_length())
    return min(block_size, covering)


def check_flag(name: str, value: object) -> bool:
    """A flag such as ``causal`` must be a bool (``numpy.bool_`` too): a string such as ``"no"`` is
    truthy, and a tensor or ``None`` is a mistake, not a choice."""
    if isinstance(value, bool):
        return value
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.bool_):
        return bool(value)
    raise TypeError(f"{name}={value!r} must be a bool (got {type(value).__name__})")


def _option_types() -> dict[str, Any]:
    from torch.nn.attention.flex_attention import FlexKernelOptions

    return typing.get_type_hints(FlexKernelOptions)


def check_kernel_options(kernel_options: object) -> dict[str, Any] | None:
    """``None`` or a mapping of FlexAttention's ``FlexKernelOptions``, keys optionally prefixed
    ``fwd_``/``bwd_``, each value of the option's type. Checked on every device, so that a misspelt
    option fails on the CPU as it would on the GPU."""
    if kernel_options is None:
        return None
    if not isinstance(kernel_options, Mapping):
        raise TypeError(
            f"kernel_options={kernel_options!r} must be a mapping of FlexKernelOptions or None "
            f"(got {type(kernel_options).__name__})"
        )
    types = _option_types()
    checked: dict[str, Any] = {}
    for key, value in kernel_options.items():
        if not isinstance(key, str):
            raise TypeError(f"kernel_options key {key!r} must be a str (a FlexKernelOptions name)")
        name = key[len("fwd_") :] if key.startswith(_OPTION_PREFIXES) else key
        expected = types.get(name)
        if expected is None:
            raise ValueError(
                f"kernel_options key {key!r} is not a FlexKernelOptions name (optionally prefixed "
                f"fwd_/bwd_); known: {', '.join(sorted(types))}"
            )
        if typing.get_origin(expected) is typing.Literal:
            allowed = typing.get_args(expected)
            if value not in allowed or not isinstance(value, str):
                raise ValueError(f"kernel_options[{key!r}]={value!r} must be one of {allowed}")
        elif expected is bool:
            if not isinstance(value, bool):
                raise TypeError(f"kernel_options[{key!r}]={value!r} must be a bool")
        elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"kernel_options[{key!r}]={value!r} must be an int")
        elif value < 0:
            raise ValueError(f"kernel_options[{key!r}]={value!r} must be an int >= 0")
        checked[key] = value if isinstance(value, (bool, str)) else int(value)
    return checked


def check_seq_len(seq_len: object) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral):
        raise TypeError(f"seq_len={seq_len!r} must be an int (got {type(seq_len).__name__})")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    return int(seq_len)


def check_num_heads(num_heads: object) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral):
        raise TypeError(f"num_heads={num_heads!r} must be an int (got {type(num_heads).__name__})")
    if num_heads < 1:
        raise ValueError(f"num_heads={num_heads} must be >= 1")
    return int(num_heads)


def check_batch(batch: object) -> int:
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral):
        raise TypeError(f"batch={batch!r} must be an int (got {type(batch).__name__})")
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    return int(batch)
