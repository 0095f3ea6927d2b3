"""The patterns' rules restated independently of the package (plain Python loops), as the oracle's masks."""

from __future__ import annotations

from collections.abc import Callable

import torch

Rule = Callable[[int, int, int], bool]  # (head, query, key) -> allowed


def dense(rule: Rule, n: int, heads: int, *, causal: bool = False) -> torch.Tensor:
    """``(heads, n, n)`` bool from a per-entry rule."""
    out = torch.zeros(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        for i in range(n):
            for j in range(n):
                out[h, i, j] = rule(h, i, j) and (not causal or j <= i)
    return out


def local(window: int) -> Rule:
    return lambda h, i, j: abs(i - j) <= window


def dilated(segment_blocks: int, dilation: int, block: int) -> Rule:
    def rule(h: int, i: int, j: int) -> bool:
        bi, bj = i // block, j // block
        if bi // segment_blocks != bj // segment_blocks:
            return False
        return (bi % segment_blocks) % dilation == h % dilation == (bj % segment_blocks) % dilation

    return rule


def global_local(num_global: int, window: int) -> Rule:
    return lambda h, i, j: abs(i - j) <= window or i < num_global or j < num_global


def strided(stride: int) -> Rule:
    return lambda h, i, j: (i - j) % stride == 0


def table(allowed_blocks: torch.Tensor, block: int) -> Rule:
    return lambda h, i, j: bool(allowed_blocks[i // block, j // block])


def any_of(*rules: Rule) -> Rule:
    return lambda h, i, j: any(r(h, i, j) for r in rules)


def all_of(*rules: Rule) -> Rule:
    return lambda h, i, j: all(r(h, i, j) for r in rules)
