"""The benchmark workloads: the named presets of SPEC §3 and explicit overrides of them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from dilated_attn.pattern import DilationPattern, check_mode

from dilated_attn_bench.choices import CPU_DEFAULT_PRESETS, DTYPE_NAMES, GPU_DEFAULT_PRESETS

DTYPES: dict[str, torch.dtype] = dict(
    zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16, torch.float64), strict=True)
)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``: the short name used on the command line and in reports."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype={dtype} is not one of the benchmarked dtypes {sorted(DTYPES)}")


@dataclass(frozen=True)
class Workload:
    """One benchmarked shape: inputs ``(batch, seq_len, heads, head_dim)`` and a dilation pattern."""

    preset: str
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    causal: bool = False
    mode: str = "longnet"

    def __post_init__(self) -> None:
        for name in ("batch", "seq_len", "heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive int")
        check_mode(self.mode)
        DilationPattern(self.segment_lengths, self.dilation_rates)
        dtype_name(self.dtype)

    @property
    def pattern(self) -> DilationPattern:
        return DilationPattern.of(self.segment_lengths, self.dilation_rates)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def key(self) -> tuple[Any, ...]:
        """Identity of the shape of work, preset name excluded (two presets may share a shape)."""
        return (
            self.batch,
            self.seq_len,
            self.heads,
            self.head_dim,
            dtype_name(self.dtype),
            self.segment_lengths,
            self.dilation_rates,
            self.causal,
            self.mode,
        )

    def describe(self) -> str:
        return describe_shape(
            self.batch,
            self.seq_len,
            self.heads,
            self.head_dim,
            dtype_name(self.dtype),
            self.mode,
            self.causal,
        )


def describe_shape(
    batch: int, seq_len: int, heads: int, head_dim: int, dtype: str, mode: str, causal: bool
) -> str:
    """``b=1, n=4,096, h=4, d=32, fp32, longnet`` (``, causal`` when causal): how reports name a shape."""
    return f"b={batch}, n={seq_len:,}, h={heads}, d={head_dim}, {dtype}, {mode}" + (
        ", causal" if causal else ""
    )


class Preset(NamedTuple):
    """A named set of workloads: every batch x every length, one shape and pattern."""

    dtype: torch.dtype
    batches: tuple[int, ...]
    seq_lens: tuple[int, ...]
    heads: int
    head_dim: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]


_LONGNET_SEGMENTS = (2048, 4096, 8192, 16384, 32768)
_SEED_LENGTHS = (2048, 4096, 8192, 16384, 32768)

# SPEC §3, verbatim.
PRESETS: dict[str, Preset] = {
    "longnet-1m": Preset(torch.bfloat16, (1,), (1_048_576,), 16, 64, _LONGNET_SEGMENTS, (1, 2, 4, 8, 16)),
    "longnet-256k": Preset(torch.bfloat16, (1,), (262_144,), 16, 64, _LONGNET_SEGMENTS, (1, 2, 4, 8, 16)),
    "paper": Preset(torch.bfloat16, (1,), (262_144,), 12, 64, _LONGNET_SEGMENTS, (1, 2, 4, 6, 12)),
    "seed-fp32": Preset(torch.float32, (1, 2, 4), _SEED_LENGTHS, 8, 64, (2048, 4096, 8192), (1, 2, 4)),
    "cpu-quick": Preset(torch.float32, (1,), (4096,), 4, 32, (512, 1024, 2048), (1, 2, 4)),
}

__all__ = [
    "CPU_DEFAULT_PRESETS",
    "DTYPES",
    "GPU_DEFAULT_PRESETS",
    "PRESETS",
    "Overrides",
    "Workload",
    "expand",
]


@dataclass(frozen=True)
class Overrides:
    """Explicit command-line values; ``None`` keeps the preset's value."""

    batch: Sequence[int] | None = None
    seq_len: Sequence[int] | None = None
    heads: int | None = None
    head_dim: int | None = None
    dtype: torch.dtype | None = None
    segment_lengths: Sequence[int] | None = None
    dilation_rates: Sequence[int] | None = None
    causal: bool | None = None
    mode: str | None = None

    def any(self) -> bool:
        return any(getattr(self, f.name) is not None for f in dataclasses.fields(self))


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def expand(presets: Sequence[str], overrides: Overrides = Overrides()) -> list[Workload]:
    """The workloads of ``presets`` with ``overrides`` applied, duplicates dropped, in order.

    A preset that lists several batches or lengths gives one workload per combination; an
    overridden preset is labelled ``<name>*``. Every workload is validated (``ValueError``).
    """
    out: list[Workload] = []
    seen: set[tuple[Any, ...]] = set()
    for name in presets:
        if name not in PRESETS:
            raise ValueError(f"preset={name!r} is not a known preset; known presets: {sorted(PRESETS)}")
        preset = PRESETS[name]
        label = f"{name}*" if overrides.any() else name
        for batch in _pick(overrides.batch, preset.batches):
            for seq_len in _pick(overrides.seq_len, preset.seq_lens):
                workload = Workload(
                    preset=label,
                    batch=batch,
                    seq_len=seq_len,
                    heads=_pick(overrides.heads, preset.heads),
                    head_dim=_pick(overrides.head_dim, preset.head_dim),
                    dtype=_pick(overrides.dtype, preset.dtype),
                    segment_lengths=tuple(_pick(overrides.segment_lengths, preset.segment_lengths)),
                    dilation_rates=tuple(_pick(overrides.dilation_rates, preset.dilation_rates)),
                    causal=_pick(overrides.causal, False),
                    mode=_pick(overrides.mode, "longnet"),
                )
                if workload.key() not in seen:
                    seen.add(workload.key())
                    out.append(workload)
    return out
