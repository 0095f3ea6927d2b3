"""Sparse attention patterns: which keys each query may attend to.

A pattern is a predicate on ``(b, h, q_idx, kv_idx)`` (FlexAttention's ``mask_mod``) that
:meth:`SparsePattern.mask_mod` binds to a sequence length and a device. Patterns are frozen and
hashable: the block-mask cache is keyed on them.

Numeric parameters live in 0-d int32 tensors captured by the predicate rather than in Python ints,
so that ``torch.compile`` guards on their shape, not their value: ``local_window(256)`` and
``local_window(512)`` share one compiled kernel.

A union or intersection of patterns is a set operation: one softmax over the allowed keys of each
row, whatever the number of patterns that allow a key (unlike LongNet's mixing, where a key allowed
by two patterns counts twice).
"""

from __future__ import annotations

import abc
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dilated_attn_sparse.predicates import MaskMod, arguments_read
from dilated_attn_sparse.validation import check_block_size

if TYPE_CHECKING:
    from dilated_attn_sparse.stats import SparsityStats


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an int (got {type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name}={value} must be an int >= {minimum}")
    return int(value)


def _scalar(value: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int32, device=device)


class SparsePattern(abc.ABC):
    """Which keys each query may attend to, at token granularity."""

    @property
    def per_head(self) -> bool:
        """Whether heads differ; a head-independent pattern builds one mask shared by all heads."""
        return False

    @abc.abstractmethod
    def mask_mod(self, seq_len: int, device: torch.device) -> MaskMod:
        """The predicate ``(b, h, q_idx, kv_idx) -> bool`` for sequences of ``seq_len`` tokens."""

    def mask_extents(self, device: torch.device) -> tuple[bool, bool]:
        """``(per_sequence, per_head)``: whether block masks on ``device`` must be built for every
        sequence of the batch and for every head, rather than once and broadcast."""
        return False, self.per_head

    def stats(
        self,
        seq_len: int,
        *,
        num_heads: int = 1,
        block_size: int = 128,
        causal: bool = False,
        device: torch.device | str = "cpu",
    ) -> SparsityStats:
        """Blocks computed and allowed (query, key) pairs at this length (see :mod:`.stats`)."""
        from dilated_attn_sparse.stats import sparsity_stats

        return sparsity_stats(
            self, seq_len, num_heads=num_heads, block_size=block_size, causal=causal, device=device
        )

    def density(
        self,
        seq_len: int,
        *,
        num_heads: int = 1,
        block_size: int = 128,
        causal: bool = False,
        device: torch.device | str = "cpu",
    ) -> float:
        """Fraction of the ``(query block, key block)`` pairs that FlexAttention computes."""
        return self.stats(
            seq_len, num_heads=num_heads, block_size=block_size, causal=causal, device=device
        ).density

    def flops(
        self,
        seq_len: int,
        num_heads: int,
        head_dim: int,
        *,
        batch: int = 1,
        block_size: int = 128,
        causal: bool = False,
        backward: bool = False,
        device: torch.device | str = "cpu",
    ) -> float:
        """Useful FLOPs: ``4 b d`` per allowed (query, key) pair and head; fwd+bwd counts 3.5x."""
        stats = self.stats(seq_len, num_heads=num_heads, block_size=block_size, causal=causal, device=device)
        return stats.flops(head_dim, batch=batch, backward=backward)

    def __or__(self, other: SparsePattern) -> SparsePattern:
        return union(self, other)

    def __and__(self, other: SparsePattern) -> SparsePattern:
        return intersection(self, other)


@dataclass(frozen=True)
class LocalWindow(SparsePattern):
    """Query ``i`` sees key ``j`` iff ``|i - j| <= window``."""

    window: int

    def __post_init__(self) -> None:
        _check_int("window", self.window, 0)

    def mask_mod(self, seq_len: int, device: torch.device) -> MaskMod:
        window = _scalar(self.window, device)

        def local_window(
            b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            return (q_idx - kv_idx).abs() <= window

        return local_window


@dataclass(frozen=True)
class DilatedBlocks(SparsePattern):
    """LongNet's dilation at block granularity.

    The sequence is cut into segments of ``segment_blocks`` blocks of ``block_size`` tokens (the
    last may be shorter). Head ``h`` selects the blocks of a segment whose index within it ``t`` has
    ``t % dilation == h % dilation``; a query in a selected block sees every key in the selected
    blocks of its segment. Queries in unselected blocks see nothing (output 0), as in LongNet, so
    union it with a pattern that covers every row when every row needs an output.
    """

    segment_blocks: int
    dilation: int
    block_size: int = 128

    def __post_init__(self) -> None:
        _check_int("segment_blocks", self.segment_blocks, 1)
        _check_int("dilation", self.dilation, 1)
        check_block_size(self.block_size)
        if self.dilation > self.segment_blocks:
            raise ValueError(f"dilation={self.dilation} must be <= segment_blocks={self.segment_blocks}")

    @property
    def per_head(self) -> bool:
        return self.dilation > 1

    def mask_mod(self, seq_len: int, device: torch.device) -> MaskMod:
        segment = _scalar(self.segment_blocks, device)
        dilation = _scalar(self.dilation, device)
        block = self.block_size

        def dilated_blocks(
            b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            q_block = q_idx // block
            kv_block = kv_idx // block
            offset = h % dilation
            return (
                (q_block // segment == kv_block // segment)
                & ((q_block % segment) % dilation == offset)
                & ((kv_block % segment) % dilation == offset)
            )

        return dilated_blocks


@dataclass(frozen=True)
class GlobalLocal(SparsePattern):
    """A local window plus ``global_tokens`` leading tokens that see, and are seen by, every token."""

    global_tokens: int
    window: int

    def __post_init__(self) -> None:
        _check_int("global_tokens", self.global_tokens, 0)
        _check_int("window", self.window, 0)

    def mask_mod(self, seq_len: int, device: torch.device) -> MaskMod:
        num_global = _scalar(self.global_tokens, device)
        window = _scalar(self.window, device)

        def global_local(
            b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            return ((q_idx - kv_idx).abs() <= window) | (q_idx < num_global) | (kv_idx < num_global)

        return global_local


@dataclass(frozen=True)
class Strided(SparsePattern):
    """Query ``i`` sees key ``j`` iff ``(i - j) % stride == 0``.

    The "column" half of the Sparse Transformer's strided attention (Child et al., 2019); union it
    with ``local_window(stride - 1)`` for the whole pattern. Every block holds allowed pairs once
    ``stride <= block_size``, so it only saves work with a stride above the block size.
    """

    stride: int

    def __post_init__(self) -> None:
        _check_int("stride", self.stride, 1)

    def mask_mod(self, seq_len: int, device: torch.device) -> MaskMod:
        stride = _scalar(self.stride, device)

        def strided(
            b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            return (q_idx - kv_idx) % stride == 0

        return strided


@dataclass(frozen=True)
class RandomBlocks(SparsePattern):
    """A random set of ``(query block, key block)`` pairs, the same for every head.

    Exactly ``max(1, round(target_density * nb**2))`` of the ``nb = ceil(n / block_size)`` squared
    block pairs are allowed, drawn by ``seed``; rows whose block drew nothing output 0.
    """

    target_density: float
    seed: int = 0
    block_size: int = 128

    def __post_init__(self) -> None:
        density = self.target_density
        if isinstance(density, bool) or not isinstance(density, numbers.Real):
            raise TypeError(f"density={density!r} must be a float in (0, 1]")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density={density!r} must be in (0, 1]")
        _check_int("seed", self.seed, 0)
        check_block_size(self.block_size)

    def table(self, seq_len: int) -> torch.Tensor:
        """``(nb, nb)`` bool: which block pairs are allowed at this length."""
        nb = math.ceil(seq_len / self.block_size)
        count = max(1, round(self.target_density * nb * nb))
        generator = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(nb * nb, generator=generator)[:count]
        table = torch.zeros(nb * nb, dtype=torch.bool)
        table[chosen] = True
        return table.view(nb, nb)

    def mask_mod(self, seq_len: int, device: torch.device) -> MaskMod:
        table = self.table(seq_len).to(device)
        last = table.shape[0] - 1
        block = self.block_size

        def random_blocks(
            b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            # Kernels may evaluate the padding past the last token: keep the lookup in bounds.
            return table[(q_idx // block).clamp(max=last), (kv_idx // block).clamp(max=last)]

        return random_blocks


@dataclass(frozen=True)
class FromMaskMod(SparsePattern):
    """A user predicate ``fn(b, h, q_idx, kv_idx) -> bool`` on index tensors.

    ``fn`` must be elementwise (FlexAttention evaluates it on scalars under ``vmap`` and on tiles of
    indices). It may read the batch index ``b``: its masks are then built for every sequence of the
    batch (``batch`` times the memory of one). Pass ``per_head=False`` when it ignores ``h``, so that
    one mask serves every head; a ``fn`` that reads ``h`` with ``per_head=False`` is refused. Which
    indices ``fn`` reads is found by tracing it (:mod:`.predicates`).
    """

    fn: MaskMod
    heads_differ: bool = True

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"fn={self.fn!r} must be callable as fn(b, h, q_idx, kv_idx)")

    @property
    def per_head(self) -> bool:
        return self.heads_differ

    def mask_mod(self, seq_len: int, device: torch.device) -> MaskMod:
        return self.fn

    def mask_extents(self, device: torch.device) -> tuple[bool, bool]:
        reads = arguments_read(self.fn, device)
        if reads is None:
            return True, True
        if "h" in reads and not self.heads_differ:
            raise ValueError(
                f"from_mask_mod(fn={self.fn!r}, per_head=False): fn reads the head index h, so one "
                "mask cannot serve every head; pass per_head=True (or make fn ignore h)"
            )
        return "b" in reads, self.heads_differ


def _any_extents(parts: tuple[SparsePattern, ...], device: torch.device) -> tuple[bool, bool]:
    extents = [part.mask_extents(device) for part in parts]
    return any(batch for batch, _ in extents), any(head for _, head in extents)


def _check_parts(name: str, parts: tuple[object, ...]) -> tuple[SparsePattern, ...]:
    if len(parts) < 2:
        raise ValueError(f"{name} of {len(parts)} pattern(s): it needs at least 2")
    for i, part in enumerate(parts):
        if not isinstance(part, SparsePattern):
            raise TypeError(f"{name} part {i}={part!r} must be a SparsePattern")
    return parts  # type: ignore[return-value]


@dataclass(frozen=True)
class AnyOf(SparsePattern):
    """Keys allowed by any of ``parts``."""

    parts: tuple[SparsePattern, ...]

    def __post_init__(self) -> None:
        _check_parts("union", self.parts)

    @property
    def per_head(self) -> bool:
        return any(p.per_head for p in self.parts)

    def mask_extents(self, device: torch.device) -> tuple[bool, bool]:
        return _any_extents(self.parts, device)

    def mask_mod(self, seq_len: int, device: torch.device) -> MaskMod:
        from torch.nn.attention.flex_attention import or_masks

        return or_masks(*(p.mask_mod(seq_len, device) for p in self.parts))


@dataclass(frozen=True)
class AllOf(SparsePattern):
    """Keys allowed by every one of ``parts``."""

    parts: tuple[SparsePattern, ...]

    def __post_init__(self) -> None:
        _check_parts("intersection", self.parts)

    @property
    def per_head(self) -> bool:
        return any(p.per_head for p in self.parts)

    def mask_extents(self, device: torch.device) -> tuple[bool, bool]:
        return _any_extents(self.parts, device)

    def mask_mod(self, seq_len: int, device: torch.device) -> MaskMod:
        from torch.nn.attention.flex_attention import and_masks

        return and_masks(*(p.mask_mod(seq_len, device) for p in self.parts))


def local_window(window: int) -> LocalWindow:
    """Query ``i`` sees key ``j`` iff ``|i - j| <= window`` (``window >= 0``)."""
    return LocalWindow(window)


def dilated_blocks(segment_blocks: int, dilation: int, block_size: int = 128) -> DilatedBlocks:
    """LongNet dilation at block granularity: segments of ``segment_blocks`` blocks, every
    ``dilation``-th block of a segment selected, with offset ``h % dilation`` for head ``h``."""
    return DilatedBlocks(segment_blocks, dilation, block_size)


def global_local(global_tokens: int, window: int) -> GlobalLocal:
    """``local_window(window)`` plus ``global_tokens`` leading tokens connected to everything."""
    return GlobalLocal(global_tokens, window)


def strided(stride: int) -> Strided:
    """Query ``i`` sees key ``j`` iff ``(i - j) % stride == 0``."""
    return Strided(stride)


def random_blocks(density: float, seed: int = 0, block_size: int = 128) -> RandomBlocks:
    """A fraction ``density`` in (0, 1] of the block pairs, drawn by ``seed``, shared by all heads."""
    return RandomBlocks(density, seed, block_size)


def from_mask_mod(fn: MaskMod, *, per_head: bool = True) -> FromMaskMod:
    """Wrap a FlexAttention ``mask_mod``; ``per_head=False`` when it ignores the head index."""
    return FromMaskMod(fn, per_head)


def union(*patterns: SparsePattern) -> AnyOf:
    """Keys allowed by any pattern (one softmax over the union)."""
    return AnyOf(tuple(patterns))


def intersection(*patterns: SparsePattern) -> AllOf:
    """Keys allowed by every pattern."""
    return AllOf(tuple(patterns))
