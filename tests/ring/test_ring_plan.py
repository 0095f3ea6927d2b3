"""The ring plan's geometry, checked on every rank of random layouts without any process group."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("dilated_attn_ring")

from dilated_attn.ops import PatternJob, jobs_for  # noqa: E402
from dilated_attn.pattern import DilationPattern  # noqa: E402
from dilated_attn_ring.plan import RankPlan, Traffic, rank_plan  # noqa: E402


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[PatternJob, ...], int, int, int, bool]:
    world = draw(st.integers(1, 6))
    m = draw(st.integers(1, 20))
    h = draw(st.integers(1, 5))
    n = world * m
    jobs = []
    for _ in range(draw(st.integers(1, 4))):
        W = draw(st.integers(1, n))
        r = draw(st.integers(1, W + 2))
        heads = draw(st.lists(st.integers(0, h - 1), min_size=1, max_size=h, unique=True))
        jobs.append(PatternJob(W, r, tuple(sorted(heads))))
    return tuple(jobs), m, world, h, draw(st.booleans())


def _plans(jobs: tuple[PatternJob, ...], m: int, world: int, causal: bool) -> list[RankPlan]:
    return [rank_plan(jobs, m, world, rank, causal) for rank in range(world)]


def _selected(job: PatternJob, n: int, start: int, stop: int, head: int) -> list[int]:
    """Global positions in ``[start, stop)`` that ``head`` selects for ``job`` (SPEC 1)."""
    return [p for p in range(start, stop) if (p % job.segment) % job.dilation == head % job.dilation]


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_every_row_is_local_or_in_exactly_one_piece(layout) -> None:
    jobs, m, world, _, causal = layout
    for rank, plan in enumerate(_plans(jobs, m, world, causal)):
        for job_index, job in enumerate(jobs):
            covered = [0] * m
            for run in plan.local:
                if job in run.jobs:
                    for row in range(run.start, run.stop):
                        covered[row] += 1
            for piece in plan.pieces:
                if piece.job == job_index:
                    for p in range(piece.start, piece.stop):
                        covered[p - rank * m] += 1
            assert covered == [1] * m
            assert sum(p.job == job_index for p in plan.pieces) <= 2


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_local_runs_start_on_segment_boundaries(layout) -> None:
    jobs, m, world, _, causal = layout
    for rank, plan in enumerate(_plans(jobs, m, world, causal)):
        for run in plan.local:
            for job in run.jobs:
                assert (rank * m + run.start) % job.segment == 0
                end = rank * m + run.stop
                assert end % job.segment == 0 or end == world * m


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_pieces_select_the_rows_of_their_heads(layout) -> None:
    jobs, m, world, _, causal = layout
    n = world * m
    for rank, plan in enumerate(_plans(jobs, m, world, causal)):
        for piece in plan.pieces:
            job = jobs[piece.job]
            assert piece.segment == piece.start // job.segment
            rows = {}
            for block in piece.blocks:
                for head, first in zip(block.heads, block.firsts):
                    rows[head] = [rank * m + first + job.dilation * i for i in range(block.count)]
            for head in job.heads:
                assert rows.get(head, []) == _selected(job, n, piece.start, piece.stop, head)


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_transfers_match_between_ranks(layout) -> None:
    """What a rank sends a peer at a step is what the peer expects from it there, in order."""
    jobs, m, world, h, causal = layout
    plans = _plans(jobs, m, world, causal)
    for plan in plans:
        for step in plan.steps:
            for peer in {send.peer for send in step.sends}:
                assert abs(peer - plan.rank) == step.distance
                assert peer > plan.rank or not causal
                sent = [plan.pieces[send.piece] for send in step.sends if send.peer == peer]
                theirs = next(s for s in plans[peer].steps if s.distance == step.distance)
                assert [r.remote for r in theirs.receipts if r.peer == plan.rank] == sent
            # Memory per rank is bounded whatever the world size: one piece per job and neighbour.
            assert len(step.receipts) <= 2 * len(jobs) and len(step.sends) <= 2 * len(jobs)
            for receipt in step.receipts:
                assert receipt.peer < plan.rank or not causal
                assert receipt.remote.size <= m * h
                own = plan.pieces[receipt.own]
                assert (own.job, own.segment) == (receipt.remote.job, receipt.remote.segment)


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_every_shared_key_reaches_every_query_of_its_segment(layout) -> None:
    """Per head, the pieces a piece meets (itself and its receipts) tile its segment's selected keys."""
    jobs, m, world, _, causal = layout
    n = world * m
    for plan in _plans(jobs, m, world, causal):
        for own_index, own in enumerate(plan.pieces):
            job = jobs[own.job]
            met: dict[int, int] = {}
            for step in plan.steps:
                for receipt in step.receipts:
                    if receipt.own != own_index:
                        continue
                    for pairing in receipt.pairings:
                        block = receipt.remote.blocks[pairing.other_block]
                        positions = pairing.other_heads or range(len(block.heads))
                        for i in positions:
                            met[block.heads[i]] = met.get(block.heads[i], 0) + block.count
            own_heads = {h for block in own.blocks for h in block.heads}
            seg_start = own.segment * job.segment
            seg_end = min(seg_start + job.segment, n)
            for head in own_heads:
                before = _selected(job, n, seg_start, own.start, head)
                after = _selected(job, n, own.stop, seg_end, head)
                assert met.get(head, 0) == len(before) + (0 if causal else len(after))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 64), st.booleans())
def test_segments_dividing_the_chunk_need_no_transfers(world: int, m: int, causal: bool) -> None:
    divisors = [w for w in (1, 2, 3, 4, 8, 16, 32) if m % w == 0]
    pattern = DilationPattern(divisors, [min(w, 2) for w in divisors])
    jobs = jobs_for(pattern, world * m, 4, "longnet")
    for plan in _plans(jobs, m, world, causal):
        assert plan.one_local_run and not plan.pieces and not plan.steps


def test_one_rank_runs_everything_locally() -> None:
    jobs = jobs_for(DilationPattern([3, 5, 100], [1, 2, 7]), 13, 3, "head_groups")
    plan = rank_plan(jobs, 13, 1, 0, False)
    assert not plan.pieces and not plan.steps
    assert plan.one_local_run and plan.local[0].jobs == jobs


def test_whole_sequence_segment_reaches_every_rank() -> None:
    world, m = 4, 8
    jobs = jobs_for(DilationPattern([10**6], [2]), world * m, 2, "longnet")
    plans = _plans(jobs, m, world, False)
    for plan in plans:
        peers = {receipt.peer for step in plan.steps for receipt in step.receipts}
        assert peers == set(range(world)) - {plan.rank}
        assert [(p.start, p.stop) for p in plan.pieces] == [(plan.rank * m, (plan.rank + 1) * m)]


@settings(max_examples=100, deadline=None)
@given(layouts())
def test_traffic_sent_is_traffic_received(layout) -> None:
    jobs, m, world, _, causal = layout
    plans = _plans(jobs, m, world, causal)
    assert sum(p.sent_pairs for p in plans) == sum(p.received_pairs for p in plans)
    moved = [p.traffic(2, 8, 2) for p in plans]
    assert sum(t.forward_sent for t in moved) == sum(t.forward_received for t in moved)
    assert sum(t.backward_sent for t in moved) == sum(t.backward_received for t in moved)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("world", [2, 3, 8])
def test_traffic_of_a_whole_sequence_pattern(world: int, causal: bool) -> None:
    """w = n, r = 4 on 12 rows per rank: every rank's piece (3 rows per head, 2 heads) goes to every
    other rank, or only to the later ones when causal; gradients come back in float32."""
    m, h, d = 12, 2, 8
    jobs = jobs_for(DilationPattern([1 << 20], [4]), world * m, h, "longnet")
    for rank, plan in enumerate(_plans(jobs, m, world, causal)):
        piece_pairs = h * (m // 4)
        later, earlier = world - 1 - rank, rank
        assert plan.sent_pairs == piece_pairs * (later if causal else world - 1)
        assert plan.received_pairs == piece_pairs * (earlier if causal else world - 1)
        t = plan.traffic(1, d, 2)
        assert t.forward_sent == plan.sent_pairs * 2 * d * 2
        assert t.backward_sent == t.forward_sent + plan.received_pairs * 2 * d * 4
        assert t.backward_received == t.forward_received + plan.sent_pairs * 2 * d * 4


def test_dividing_patterns_move_nothing() -> None:
    jobs = jobs_for(DilationPattern([4, 8, 16], [1, 2, 4]), 4 * 16, 4, "longnet")
    for plan in _plans(jobs, 16, 4, False):
        assert plan.traffic(1, 64, 2) == Traffic(0, 0, 0, 0)
