from __future__ import annotations

import pytest
from dilated_attn.pattern import DilationPattern


def test_validation_names_argument_value_and_rule():
    with pytest.raises(
        ValueError, match=r"segment_lengths=\[8, 16\] and dilation_rates=\[1\] must have the same length"
    ):
        DilationPattern([8, 16], [1])
    with pytest.raises(ValueError, match=r"dilation_rates\[1\]=32 must be <= segment_lengths\[1\]=16"):
        DilationPattern([8, 16], [1, 32])
    with pytest.raises(TypeError, match=r"segment_lengths\[0\]=8.0 must be an int"):
        DilationPattern([8.0], [1])
    with pytest.raises(ValueError, match=r"dilation_rates\[0\]=0 must be a positive int"):
        DilationPattern([8], [0])
    with pytest.raises(TypeError, match="must be a sequence"):
        DilationPattern("8", [1])
    with pytest.raises(ValueError, match="at least one"):
        DilationPattern([], [])
    with pytest.raises(TypeError):
        DilationPattern([True], [1])


def test_effective_lengths_and_head_sets():
    p = DilationPattern([4, 64], [1, 2])
    assert p.effective(10) == [(4, 1), (10, 2)]
    assert [list(s) for s in p.head_sets(5, "longnet")] == [list(range(5))] * 2
    assert [list(s) for s in p.head_sets(5, "head_groups")] == [[0, 1, 2], [3, 4]]
    assert [list(s) for s in DilationPattern([2, 4, 8], [1, 2, 4]).head_sets(2, "head_groups")] == [
        [0],
        [1],
        [],
    ]
    with pytest.raises(ValueError, match="mode='dense' must be one of"):
        p.head_sets(4, "dense")


def test_flops_follow_the_spec_formula():
    p = DilationPattern([2048, 4096], [1, 2])
    n, h, d = 8192, 16, 64
    expected = 4 * h * (n / 2048) * 2048**2 * d + 4 * h * (n / 4096) * 2048**2 * d
    assert p.flops(n, h, d) == pytest.approx(expected)
    assert p.flops(n, h, d, causal=True) == pytest.approx(expected / 2)
    assert p.flops(n, h, d, backward=True) == pytest.approx(expected * 3.5)
    groups = 4 * 8 * (n / 2048) * 2048**2 * d + 4 * 8 * (n / 4096) * 2048**2 * d
    assert p.flops(n, h, d, mode="head_groups") == pytest.approx(groups)


def test_patterns_are_hashable_values():
    assert DilationPattern([8, 16], [1, 2]) == DilationPattern((8, 16), (1, 2))
    assert hash(DilationPattern([8], [2])) == hash(DilationPattern((8,), (2,)))
    assert DilationPattern.of([8], [2]) == DilationPattern((8,), (2,))
    # Equal-but-float entries are still refused: 16.0 == 16 in Python, so no cache may be keyed by value.
    DilationPattern.of([8, 16], [1, 2])
    with pytest.raises(TypeError, match=r"segment_lengths\[1\]=16.0 must be an int"):
        DilationPattern.of([8, 16.0], [1, 2])
