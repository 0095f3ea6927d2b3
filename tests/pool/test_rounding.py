"""Bucket sizes: the documented rule, and the Rust ledger rounding exactly as the Python one."""

from __future__ import annotations

import pytest
from dilated_attn.pool import LARGE_BYTES, MAX_REQUEST_BYTES, round_bytes
from hypothesis import given
from hypothesis import strategies as st

MIB = 1 << 20


@pytest.mark.parametrize(
    ("nbytes", "rounded"),
    [
        (0, 512),
        (1, 512),
        (512, 512),
        (513, 1024),
        (MIB, MIB),
        (MIB + 1, MIB + MIB // 4),
        (5 * MIB, 5 * MIB),
        (5 * MIB + 1, 6 * MIB),
        (7 * MIB + 1, 8 * MIB),
        (1 << 40, 1 << 40),
    ],
)
def test_documented_examples(nbytes: int, rounded: int) -> None:
    assert round_bytes(nbytes) == rounded


@given(st.integers(0, MAX_REQUEST_BYTES - 1))
def test_rounding_rule(nbytes: int) -> None:
    rounded = round_bytes(nbytes)
    assert rounded >= nbytes and rounded % 512 == 0
    if nbytes <= LARGE_BYTES:
        assert rounded - max(nbytes, 1) < 512
    else:
        floor = 1 << (nbytes.bit_length() - 1)
        assert (rounded - floor) % (floor // 4) == 0
        assert rounded - nbytes < floor // 4


@given(st.one_of(st.integers(0, 4 * MIB), st.integers(0, MAX_REQUEST_BYTES - 1)))
def test_rust_rounds_like_python(nbytes: int) -> None:
    pool_rs = pytest.importorskip("dilated_attn_pool._pool_rs")
    assert pool_rs.round_bytes(nbytes) == round_bytes(nbytes)


def test_rust_refuses_oversized_requests() -> None:
    pool_rs = pytest.importorskip("dilated_attn_pool._pool_rs")
    with pytest.raises(ValueError, match=r"nbytes=4611686018427387904 is too large"):
        pool_rs.round_bytes(MAX_REQUEST_BYTES)
