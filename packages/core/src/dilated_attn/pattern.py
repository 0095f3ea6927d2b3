"""The dilation pattern: segment lengths and dilation rates, validated once.

Pattern ``i`` cuts the sequence into segments of ``W_i = min(w_i, n)`` positions (the last may be
shorter); head ``j`` keeps the positions of a segment whose index ``t`` within it has
``t % r_i == j % r_i``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

MODES = ("longnet", "head_groups")


# A segment longer than the sequence is the whole sequence (``W = min(w, n)``), so huge values are
# meaningful; they must still fit the 64-bit arithmetic of the plans and kernels.
MAX_PATTERN_VALUE = 2**62


def _as_int_tuple(name: str, values: object) -> tuple[int, ...]:
    if hasattr(values, "tolist") and not isinstance(values, (str, bytes)):
        values = values.tolist()  # numpy arrays and tensors of ints
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name}={values!r} must be a sequence of positive ints")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name}[{i}]={v!r} must be an int (got {type(v).__name__})")
        value = int(v)
        if value <= 0:
            raise ValueError(f"{name}[{i}]={v} must be a positive int")
        if value > MAX_PATTERN_VALUE:
            raise ValueError(f"{name}[{i}]={v} must be at most 2**62")
        out.append(value)
    if not out:
        raise ValueError(f"{name}={values!r} must name at least one pattern")
    return tuple(out)


def check_mode(mode: object) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    return mode  # type: ignore[return-value]


@dataclass(frozen=True)
class PatternJob:
    """One pattern to run: effective segment length ``W = min(w, n)``, dilation, and its heads."""

    segment: int
    dilation: int
    heads: tuple[int, ...]


@dataclass(frozen=True)
class DilationPattern:
    """``k`` (segment length, dilation rate) pairs; validation happens here and only here."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> None:
        w = _as_int_tuple("segment_lengths", segment_lengths)
        r = _as_int_tuple("dilation_rates", dilation_rates)
        if len(w) != len(r):
            raise ValueError(
                f"segment_lengths={list(w)} and dilation_rates={list(r)} must have the same length "
                f"(got {len(w)} and {len(r)})"
            )
        for i, (wi, ri) in enumerate(zip(w, r)):
            if ri > wi:
                raise ValueError(f"dilation_rates[{i}]={ri} must be <= segment_lengths[{i}]={wi}")
        object.__setattr__(self, "segment_lengths", w)
        object.__setattr__(self, "dilation_rates", r)

    @classmethod
    def trusted(cls, segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> DilationPattern:
        """A pattern from lists that came out of a validated one (e.g. across a custom-op boundary)."""
        pattern = object.__new__(cls)
        object.__setattr__(pattern, "segment_lengths", tuple(segment_lengths))
        object.__setattr__(pattern, "dilation_rates", tuple(dilation_rates))
        return pattern

    @classmethod
    def of(
        cls, segment_lengths: Sequence[int] | DilationPattern, dilation_rates: Sequence[int] | None = None
    ) -> DilationPattern:
        """Accept a pattern or the two lists (validated on every call: it costs microseconds)."""
        if isinstance(segment_lengths, DilationPattern):
            if dilation_rates is not None:
                raise TypeError(
                    f"dilation_rates={dilation_rates!r} must be None when segment_lengths is a "
                    "DilationPattern (the pattern holds its dilation rates)"
                )
            return segment_lengths
        if dilation_rates is None:
            raise TypeError("dilation_rates=None: pass dilation_rates with segment_lengths")
        return cls(segment_lengths, dilation_rates)

    @property
    def num_patterns(self) -> int:
        return len(self.segment_lengths)

    def effective(self, n: int) -> list[tuple[int, int]]:
        """``(W_i, r_i)`` for a sequence of length ``n``: ``W_i = min(w_i, n)``."""
        return [(min(w, n), r) for w, r in zip(self.segment_lengths, self.dilation_rates)]

    def head_sets(self, num_heads: int, mode: str) -> list[range]:
        """The heads that run each pattern: all of them (longnet) or the pattern's group."""
        check_mode(mode)
        k = self.num_patterns
        if mode == "longnet":
            return [range(num_heads)] * k
        sets = []
        start = 0
        for i in range(k):
            size = num_heads // k + (1 if i < num_heads % k else 0)
            sets.append(range(start, start + size))
            start += size
        return sets

    def jobs(self, seq_len: int, num_heads: int, mode: str) -> tuple[PatternJob, ...]:
        """The patterns to run on ``num_heads`` heads of a sequence of ``seq_len`` rows (empty groups dropped)."""
        return jobs_for(self, seq_len, num_heads, mode)

    def flops(
        self,
        seq_len: int,
        num_heads: int,
        head_dim: int,
        *,
        batch: int = 1,
        mode: str = "longnet",
        causal: bool = False,
        backward: bool = False,
    ) -> float:
        """Useful FLOPs (SPEC §3): ``4 b h_i (n/W_i) (W_i/r_i)^2 d`` summed over patterns.

        Halved when causal; forward+backward counts 3.5x the forward.
        """
        total = 0.0
        for (W, r), heads in zip(self.effective(seq_len), self.head_sets(num_heads, mode)):
            total += 4.0 * batch * len(heads) * (seq_len / W) * (W / r) ** 2 * head_dim
        if causal:
            total /= 2
        if backward:
            total *= 3.5
        return total


def jobs_for(pattern: DilationPattern, n: int, num_heads: int, mode: str) -> tuple[PatternJob, ...]:
    """The jobs of ``pattern`` on a sequence of ``n`` rows with ``num_heads`` heads."""
    jobs = []
    for (W, r), heads in zip(pattern.effective(n), pattern.head_sets(num_heads, mode)):
        if len(heads):
            jobs.append(PatternJob(W, r, tuple(heads)))
    return tuple(jobs)
