"""Autotuning candidates per head_dim, and the dtype rules the kernels share.

Each kernel is tuned once per (padded head_dim, causal, dtypes, size class) by ``triton.autotune``;
the winner is cached for the process (``TRITON_CACHE_AUTOTUNING=1`` also keeps it on disk). The first
call with a given key is always a head's first launch, which overwrites its rows instead of merging
into them, so re-running it while tuning is harmless and no output needs saving and restoring.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch
import triton

INTERPRET_ENV = "TRITON_INTERPRET"
TMA_ENV = "DILATED_ATTN_TRITON_TMA"
# Head sizes whose rows the tensor-memory accelerator copies whole (16-byte multiples, <= 256 bytes).
_TMA_HEAD_DIMS = (16, 32, 64, 128)

# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M is the tile the program owns (query rows in the
# forward and dQ kernels, key rows in the dK/dV kernel); BLOCK_N is the tile it loops over. The first
# of each tier, the default for calls too small to tune, is the one the tuner picked on an H200
# (forward: 2026-11-22, longnet-1m for d = 64, medium sizes for 128 and 256; backward at d = 64 and
# 128: 2026-11-30, longnet-1m, from the candidates' timings, which also pruned the lists).
# `dilated-attn-bench compile-check` compiles them all for sm_90 (Triton 3.9, 2026-11-30): every one
# uses wgmma except the 32-row d = 256 tiles; in bf16 up to d = 128 only the d = 64 forward 128x64 with
# 4 warps (24 bytes) and the d = 128 dK/dV tiles 128x32 and 64x64 (40 and 32 bytes) spill registers
# (128x32 still timed 1.5x faster than the next), with dQ reductions also the grouped d = 64 dK/dV
# tile (88 bytes); most d = 256 tiles spill 48-300 bytes.
_CANDIDATES: dict[str, dict[int, tuple[tuple[int, int, int, int], ...]]] = {
    "forward": {
        64: ((128, 64, 8, 4), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)),
        128: ((64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (128, 128, 8, 2)),
        256: ((64, 32, 4, 2), (128, 32, 8, 2), (64, 32, 8, 2)),
    },
    "dkdv": {
        64: ((64, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 4), (128, 64, 8, 2), (128, 64, 8, 3)),
        128: ((128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3)),
        256: ((64, 32, 8, 2), (32, 32, 8, 2), (64, 16, 8, 2)),
    },
    "dq": {
        64: ((64, 64, 4, 3), (64, 32, 4, 4), (128, 32, 4, 3), (128, 32, 4, 5), (128, 64, 8, 3)),
        128: ((64, 32, 4, 3), (64, 32, 4, 5), (128, 32, 8, 2)),
        256: ((32, 32, 4, 2), (64, 16, 4, 2), (64, 32, 8, 2)),
    },
}

# Below this many (batch * seq * heads) rows a call runs the first candidate of its tier untuned:
# benchmarking a dozen compiled candidates costs more than a small call can win back.
TUNE_MIN_ROWS = 1 << 19
# From this many rows a call is tuned apart from medium ones: the tile that wins at longnet-1m
# (2^24 rows) need not win at a quarter of it, where fewer programs fill the GPU.
TUNE_LARGE_ROWS = 1 << 23

# float32 multiplies in full precision on the CUDA cores (no tensor-core path), and its operand tiles
# fill the registers: one small tile per tier, so no slow compiles of candidates that would spill.
_FLOAT32: dict[int, tuple[tuple[int, int, int, int], ...]] = {
    64: ((64, 32, 8, 2),),
    128: ((32, 32, 8, 2),),
    256: ((32, 16, 8, 1),),
}

# Under the interpreter tiles are small and deliberately unequal, so that tests on short sequences
# cross block edges, partial tails and the causal diagonal.
_INTERPRET_CONFIG = (32, 16, 4, 1)


# Read once, like triton.jit, which picks compiled or interpreted kernels when they are defined.
_INTERPRETING = os.environ.get(INTERPRET_ENV, "0") not in ("", "0")


def use_tma(*tensors: torch.Tensor, explicit_only: bool = False) -> bool:
    """Whether a kernel reads its tiles through tensor descriptors (bulk TMA copies on Hopper).

    ``DILATED_ATTN_TRITON_TMA``: ``auto`` (default: on for 16-bit inputs on sm_90+ whose head size
    is 16..128 and a power of two, with 16-byte aligned data), ``1`` (wherever eligible, the
    interpreter included), ``0`` (never: strided pointer loads). ``explicit_only``: ``auto`` means
    off (the backward, where descriptors measured no faster).
    """
    setting = os.environ.get(TMA_ENV, "auto").strip().lower()
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"{TMA_ENV}={setting!r} must be one of 'auto', '0', '1'")
    if setting == "0" or (setting == "auto" and explicit_only):
        return False
    if not tma_eligible(*tensors):
        return False
    if setting == "1":
        return True
    first = tensors[0]
    return first.is_cuda and not interpreting() and torch.cuda.get_device_capability(first.device) >= (9, 0)


def tma_eligible(*tensors: torch.Tensor) -> bool:
    """16-bit tensors whose rows the tensor memory accelerator moves whole (head size 16, 32, 64 or
    128) from 16-byte aligned addresses; says nothing about the device."""
    first = tensors[0]
    return (
        first.dtype in (torch.float16, torch.bfloat16)
        and first.shape[-1] in _TMA_HEAD_DIMS
        and all(t.data_ptr() % 16 == 0 for t in tensors)
    )


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device, which need not be the tensors': make it theirs."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def install_scratch_allocator(device: torch.device) -> None:
    """Give Triton the global scratch that in-kernel tensor descriptors live in (per launch, tiny).

    Triton keeps its allocator in a context variable, so it is set on the launching thread (the
    autograd engine runs the backward on threads of its own).
    """
    if device.type == "cuda":
        triton.set_allocator(_cuda_scratch)


def _cuda_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def interpreting() -> bool:
    """True when the kernels run on Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETING


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def _shape(config: triton.Config) -> tuple[int, int, int, int]:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def configs_for(kernel: str) -> list[triton.Config]:
    """Every candidate of ``kernel`` ("forward", "dkdv", "dq"), all head_dim tiers together."""
    shapes = {shape for candidates in _CANDIDATES[kernel].values() for shape in candidates}
    shapes.update(shape for candidates in _FLOAT32.values() for shape in candidates)
    shapes.add(_INTERPRET_CONFIG)
    return [_config(*shape) for shape in sorted(shapes)]


def _tier(head_dim_pad: int) -> int:
    return 64 if head_dim_pad <= 64 else 128 if head_dim_pad <= 128 else 256


def pruner(kernel: str) -> Callable[..., list[triton.Config]]:
    """``early_config_prune`` for ``kernel``: the candidates of the call's head_dim tier."""

    def prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
        if interpreting():
            return [c for c in configs if _shape(c) == _INTERPRET_CONFIG]
        table = _FLOAT32 if named_args["Q"].element_size() == 4 else _CANDIDATES[kernel]
        wanted = table[_tier(kwargs["HEAD_DIM_PAD"])]
        if not named_args["tune_class"]:
            wanted = wanted[:1]
        return [c for c in configs if _shape(c) in wanted]

    return prune


def tuning_class(batch: int, seq_len: int, num_heads: int) -> int:
    """0 for calls too small to autotune (see TUNE_MIN_ROWS), 1 for medium and 2 for large ones
    (from TUNE_LARGE_ROWS rows), which are tuned apart; part of the tuning key.

    It depends on the whole call, never on one pattern, so the first launch with a new key is still a
    head's first launch (see the module docstring).
    """
    rows = batch * seq_len * num_heads
    return 0 if rows < TUNE_MIN_ROWS else 1 if rows < TUNE_LARGE_ROWS else 2


def head_dim_pad(head_dim: int) -> int:
    """Tile width for ``head_dim``: the next power of two, at least 16 (the smallest ``tl.dot``)."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs multiply in full precision: TF32 would miss the 1e-5 float32 bound."""
    return "ieee" if dtype == torch.float32 else "tf32"
