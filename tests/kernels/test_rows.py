"""Row writes around the attention kernels (``dilated_attn.kernels.rows``): results scattered into the
segment engine's strided views, and the rows no launch selects zeroed, against torch's own copies and the
engine's calls (an independent enumeration of the selected rows)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from dilated_attn.kernels import rows, segments, tuning  # noqa: E402
from dilated_attn.kernels.launches import Launch, plan_launches  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not tuning.interpreting(),
    reason="CPU checks need the kernels imported under TRITON_INTERPRET=1",
)


def _views(b, n, h, d, launch, dtype, seed):
    """Target views of three fresh tensors for each call of ``launch``, and matching sources in the
    engine's layout (a ``(B, hc, S, d)`` buffer seen as ``(B, S, hc, d)``)."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(b, n, h, d, generator=g).to(dtype).to(DEVICE) for _ in range(3)]
    for call in segments._calls(b, n, launch, rows_per_call=7):
        targets = [call.view(t) for t in tensors]
        B, S, hc, _ = targets[0].shape
        sources = [
            torch.randn(B, hc, S, d, generator=g).to(dtype).to(DEVICE).transpose(1, 2) for _ in range(3)
        ]
        yield tensors, targets, sources


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [16, 24, 64])
@pytest.mark.parametrize("accumulate", [(False, False, False), (True, True, True), (True, False, False)])
def test_scatter_matches_torch_copy_and_add(dtype, d, accumulate):
    """Bitwise what ``copy_``/``add_`` give, on every call's views of a launch with r not dividing W,
    a short last segment and offset classes sharing a call."""
    b, n, h = 2, 45, 5
    launch = Launch(segment=20, dilation=3, head0=1, num_heads=4, accumulate=False, kv_accumulate=False)
    for tensors, targets, sources in _views(b, n, h, d, launch, dtype, seed=d):
        expected = [t.clone() for t in tensors]
        for e, call_target, s, acc in zip(expected, targets, sources, accumulate):  # the views of a clone
            view = e.as_strided(call_target.shape, call_target.stride(), call_target.storage_offset())
            view.add_(s) if acc else view.copy_(s)
        rows.scatter_into(targets, sources, accumulate)
        for got, want in zip(tensors, expected):
            if dtype == torch.bfloat16 and tuning.interpreting():
                # Triton's interpreter rounds float32 sums to bfloat16 toward zero (a GPU to nearest
                # even, as torch): one unit in the last place at most.
                torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
            else:
                assert torch.equal(got, want)


def test_scatter_groups_pairs_by_strides():
    """Pairs whose strides differ still land (a launch each), and one pair alone works."""
    a = torch.zeros(2, 6, 3, 8, device=DEVICE)
    b = torch.zeros(2, 3, 6, 8, device=DEVICE).transpose(1, 2)  # other strides
    sa, sb = torch.randn(2, 6, 3, 8, device=DEVICE), torch.randn(2, 6, 3, 8, device=DEVICE)
    rows.scatter_into([a, b], [sa, sb], [False, False])
    assert torch.equal(a, sa) and torch.equal(b, sb)
    rows.scatter_into([a], [sa], [True])
    assert torch.equal(a, sa + sa)
    # same strides, other shapes (a narrower view of one buffer): launches of their own
    buf = torch.zeros(2, 6, 3, 8, device=DEVICE)
    c, e = buf[:, :4], buf[:, 4:]
    sc, se = torch.randn(2, 4, 3, 8, device=DEVICE), torch.randn(2, 2, 3, 8, device=DEVICE)
    rows.scatter_into([c, e], [sc, se], [False, False])
    assert torch.equal(buf, torch.cat([sc, se], 1))


@pytest.mark.parametrize(
    "target, source, message",
    [
        ((2, 6, 3, 8), (2, 6, 3, 4), "must match"),
        ((2, 6, 3, 8), "strided", "unit stride along the last dimension"),
    ],
)
def test_scatter_refuses_bad_pairs(target, source, message):
    t = torch.zeros(*target, device=DEVICE)
    s = (
        torch.zeros(2, 6, 3, 16, device=DEVICE)[..., ::2]
        if source == "strided"
        else torch.zeros(*source, device=DEVICE)
    )
    with pytest.raises(ValueError, match=message):
        rows.scatter_into([t], [s], [False])


def _selected(b, n, h, launches):
    """1 where a launch selects (batch, row, head), counted through the engine's calls."""
    index = torch.arange(b * n * h).view(b, n, h)
    seen = torch.zeros(b * n * h, dtype=torch.long)
    for launch in launches:
        for call in segments._calls(b, n, launch):
            view = call.view(index)
            seen.index_add_(0, view.reshape(-1), torch.ones(view.numel(), dtype=torch.long))
    return seen.view(b, n, h)


@pytest.mark.parametrize(
    "b, n, h, w, r",
    [
        (1, 96, 5, [8, 12, 20, 128], [1, 3, 4, 5]),  # head groups of 2, 1, 1, 1 heads
        (2, 53, 6, [16, 10], [4, 3]),  # no r = 1 pattern, r not dividing W, short last segments
        (1, 7, 3, [32, 4], [8, 2]),  # W clipped to n; r above n
        (3, 40, 8, [20, 8, 40], [1, 2, 5]),
    ],
)
@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_uncovered_writes_exactly_the_rows_no_launch_selects(b, n, h, w, r, count, dtype):
    d = 24
    plan = plan_launches(n, h, w, r, "head_groups")
    assert rows.covered_once(plan.launches, h)
    selected = _selected(b, n, h, plan.launches).to(DEVICE)
    assert int(selected.max()) == 1  # head_groups: one launch per head
    tensors = [torch.full((b, n, h, d), float("nan"), dtype=dtype, device=DEVICE) for _ in range(count)]
    stats = torch.full((b, n, h), float("nan"), device=DEVICE)
    rows.zero_uncovered(tensors, plan.launches, stats=stats)
    for t in tensors:
        assert torch.all(t[selected == 1].isnan())  # left to the launches
        assert torch.all(t[selected == 0] == 0)
    assert torch.all(stats == float("-inf"))  # a whole fill: the launches overwrite their rows


def test_covered_once_and_the_fallback_of_start_zeroed():
    launches = plan_launches(40, 4, [8, 16], [2, 4], "longnet").launches  # every head in two launches
    assert not rows.covered_once(launches, 4)
    assert rows.covered_once(plan_launches(40, 4, [8, 16], [2, 4], "head_groups").launches, 4)
    # a head no launch covers, and a head index beyond the tensor's
    lone = (Launch(8, 2, 0, 3, False, False),)
    assert not rows.covered_once(lone, 4)
    assert not rows.covered_once(lone, 2)
    t = torch.full((1, 40, 4, 8), float("nan"), device=DEVICE)
    stats = torch.full((1, 40, 4), float("nan"), device=DEVICE)
    rows.start_zeroed([t], launches, stats=stats)
    assert torch.all(t == 0) and torch.all(stats == float("-inf"))
    with pytest.raises(ValueError, match="cover each head exactly once"):
        rows.zero_uncovered([t], launches)
    with pytest.raises(ValueError, match="one to three tensors"):
        rows.zero_uncovered([t] * 4, plan_launches(40, 4, [8], [2], "head_groups").launches)
