"""The oracle against a brute-force loop over (query, head, pattern, key)."""

from __future__ import annotations

import math

import pytest
import torch
from dilated_attn.pattern import DilationPattern
from dilated_attn.reference import dilated_attention_reference


def brute_force(q, k, v, w, r, mode, causal):
    """SPEC 1a/1b read literally: key multisets per (query, head), one softmax each."""
    b, n, h, d = q.shape
    pattern = DilationPattern(w, r)
    head_sets = pattern.head_sets(h, mode)
    out = torch.zeros(b, n, h, d, dtype=torch.float64)
    lse = torch.full((b, n, h), -math.inf, dtype=torch.float64)
    for j in range(h):
        for p in range(n):
            keys = []
            for i, (wi, ri) in enumerate(zip(w, r)):
                if j not in head_sets[i]:
                    continue
                W = min(wi, n)
                seg, t = divmod(p, W)
                if t % ri != j % ri:
                    continue
                for key in range(seg * W, min((seg + 1) * W, n)):
                    if (key - seg * W) % ri == j % ri and (not causal or key <= p):
                        keys.append(key)
            for bi in range(b):
                if not keys:
                    continue
                scores = torch.stack(
                    [q[bi, p, j].double() @ k[bi, key, j].double() for key in keys]
                ) / math.sqrt(d)
                weights = torch.softmax(scores, 0)
                out[bi, p, j] = sum(wt * v[bi, key, j].double() for wt, key in zip(weights, keys))
                lse[bi, p, j] = torch.logsumexp(scores, 0)
    return out, lse


@pytest.mark.parametrize("mode", ["longnet", "head_groups"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "n, h, w, r",
    [(13, 3, (4, 6), (1, 2)), (11, 5, (3, 8, 20), (2, 3, 4)), (9, 2, (9,), (1,)), (7, 4, (2, 4), (2, 4))],
)
def test_oracle_matches_brute_force(n, h, w, r, mode, causal):
    torch.manual_seed(n * 100 + h)
    q, k, v = (torch.randn(2, n, h, 4, dtype=torch.float64) for _ in range(3))
    out, lse = dilated_attention_reference(q, k, v, w, r, mode=mode, causal=causal, return_lse=True)
    expected_out, expected_lse = brute_force(q, k, v, w, r, mode, causal)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    finite = torch.isfinite(expected_lse)
    torch.testing.assert_close(lse[finite], expected_lse[finite], rtol=1e-12, atol=1e-12)


def test_empty_rows_are_zero_with_zero_gradients():
    # r = 2 and 3 with no r = 1: heads whose offsets match nothing in a row get no keys.
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 12, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = dilated_attention_reference(q, k, v, [6, 12], [2, 3], return_lse=True)
    empty = torch.isneginf(lse)
    assert empty.any()
    assert torch.all(out[empty] == 0)
    out.sum().backward()
    assert not torch.isnan(q.grad).any()
    assert torch.all(q.grad[empty] == 0)


def test_gradients_flow_through_the_mixing_weights():
    # The oracle's gradients equal finite differences: nothing is detached.
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 10, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda a, b, c: dilated_attention_reference(a, b, c, [4, 10], [1, 2], causal=True), (q, k, v)
    )


def test_oversized_problem_is_refused_before_allocating():
    q = torch.randn(1, 1 << 22, 4, 2)
    with pytest.raises(
        torch.OutOfMemoryError, match=r"float64 oracle needs about .* GiB for batch=1, seq=4194304, heads=4"
    ):
        dilated_attention_reference(q, q, q, [8], [1])
