"""Where each pattern's work happens when a sequence is split into equal chunks across ranks.

Rank ``q`` of ``P`` holds global positions ``[q*m, (q+1)*m)`` of a sequence of ``n = P*m``. A pattern
job with segment length ``W`` (already ``min(w, n)``) cuts ``[0, n)`` into segments. A segment that
lies inside one chunk is *interior*: its rank runs it alone, through the core's ``dilated_forward``
on a segment-aligned slice. A segment that crosses a chunk edge is *shared* by the contiguous ranks it
touches; each of them holds one *piece* of it, and each piece's selected queries must see the
selected keys of every piece of the segment.

Two ranks share at most one segment per job (segments are disjoint intervals), so the transfers are
named by the distance between ranks: at step ``distance`` a rank exchanges pieces with the ranks
``distance`` before and after it, all in one batch. Causal attention needs keys from earlier ranks
only, so pieces then flow forward alone. Everything here is plain Python, cached, and identical on
every rank that computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dilated_attn.cache import metadata_cache
from dilated_attn.pattern import PatternJob


@dataclass(frozen=True)
class HeadBlock:
    """Heads of a piece that select the same number of rows: one dense ``(b, H', count, d)`` block.

    ``firsts[i]`` is the first selected row of ``heads[i]``, local to the owner's chunk; the others
    follow at stride ``dilation``.
    """

    heads: tuple[int, ...]
    firsts: tuple[int, ...]
    count: int

    @property
    def size(self) -> int:
        return len(self.heads) * self.count


@dataclass(frozen=True)
class Piece:
    """The rows ``[start, stop)`` (global) of shared segment ``segment`` of job ``job`` on one rank."""

    job: int
    segment: int
    start: int
    stop: int
    dilation: int
    blocks: tuple[HeadBlock, ...]

    @property
    def size(self) -> int:
        """Selected (row, head) pairs: rows of the packed ``(b, size, d)`` form of the piece."""
        return sum(block.size for block in self.blocks)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Where each block starts in the packed form."""
        starts, at = [], 0
        for block in self.blocks:
            starts.append(at)
            at += block.size
        return tuple(starts)


@dataclass(frozen=True)
class Pairing:
    """Heads that attend from block ``own_block`` of a piece to block ``other_block`` of another.

    ``own_heads`` / ``other_heads`` are positions within each block's heads, or ``None`` for all of
    them in order (no head selection needed).
    """

    own_block: int
    other_block: int
    own_heads: tuple[int, ...] | None
    other_heads: tuple[int, ...] | None


@dataclass(frozen=True)
class Receipt:
    """A piece arriving from ``peer``, and how it meets the local piece ``own`` of the same segment."""

    peer: int
    remote: Piece
    own: int
    pairings: tuple[Pairing, ...]


@dataclass(frozen=True)
class Send:
    """Local piece ``piece`` going to ``peer``."""

    peer: int
    piece: int


@dataclass(frozen=True)
class Step:
    """The transfers with the ranks at ``distance``: earlier ranks first, then later ones (if any)."""

    distance: int
    sends: tuple[Send, ...]
    receipts: tuple[Receipt, ...]


@dataclass(frozen=True)
class LocalRun:
    """Interior segments of ``jobs`` covering local rows ``[start, stop)``, run with no communication."""

    start: int
    stop: int
    jobs: tuple[PatternJob, ...]


@dataclass(frozen=True)
class Traffic:
    """Bytes one rank sends and receives in a forward and in a backward (keys, values, gradients)."""

    forward_sent: int
    forward_received: int
    backward_sent: int
    backward_received: int


@dataclass(frozen=True)
class RankPlan:
    """All the work of one rank: local runs, pieces of shared segments, and the transfer steps."""

    n_local: int
    world: int
    rank: int
    jobs: tuple[PatternJob, ...]
    local: tuple[LocalRun, ...]
    pieces: tuple[Piece, ...]
    steps: tuple[Step, ...]

    @property
    def one_local_run(self) -> bool:
        """True when one local run spans the whole chunk (pieces may still merge into its rows).

        Then the local result and gradients stay in the input dtype: the run writes every row once and
        the pieces merge into it in place, so no float32 copy of the chunk's output or gradients is held.
        """
        return len(self.local) == 1 and (self.local[0].start, self.local[0].stop) == (0, self.n_local)

    @property
    def sent_pairs(self) -> int:
        """Selected (row, head) pairs of keys this rank sends in one forward (as many of values)."""
        return sum(self.pieces[send.piece].size for step in self.steps for send in step.sends)

    @property
    def received_pairs(self) -> int:
        """Selected (row, head) pairs of keys this rank receives in one forward (as many of values)."""
        return sum(receipt.remote.size for step in self.steps for receipt in step.receipts)

    def traffic(self, batch: int, head_dim: int, itemsize: int) -> Traffic:
        """What moves for inputs of ``itemsize`` bytes per element.

        The backward fetches the keys and values again and returns their gradients to the owners,
        accumulated and sent in float32 (float64 for float64 inputs).
        """
        row = 2 * batch * head_dim
        grad = row * max(itemsize, 4)
        sent, received = self.sent_pairs, self.received_pairs
        return Traffic(
            sent * row * itemsize,
            received * row * itemsize,
            sent * row * itemsize + received * grad,
            received * row * itemsize + sent * grad,
        )


def _segment_end(s: int, W: int, n: int) -> int:
    return min((s + 1) * W, n)


def _is_shared(s: int, W: int, n: int, m: int, rank: int) -> bool:
    return s * W < rank * m or _segment_end(s, W, n) > (rank + 1) * m


def shared_segment(job: PatternJob, m: int, world: int, a: int, b: int) -> int | None:
    """The segment of ``job`` that ranks ``a != b`` both hold part of, if any."""
    lo, hi = min(a, b), max(a, b)
    s = (hi * m) // job.segment
    return s if s * job.segment < (lo + 1) * m else None


def _piece(index: int, job: PatternJob, s: int, m: int, n: int, rank: int) -> Piece:
    W, r = job.segment, job.dilation
    start, stop = max(s * W, rank * m), min(_segment_end(s, W, n), (rank + 1) * m)
    # Head j selects positions p of the segment with (p - s*W) % r == j % r.
    by_count: dict[int, list[tuple[int, int]]] = {}
    for j in job.heads:
        first = start + (j % r - (start - s * W)) % r
        count = len(range(first, stop, r))
        if count:
            by_count.setdefault(count, []).append((j, first - rank * m))
    blocks = tuple(
        HeadBlock(tuple(j for j, _ in heads), tuple(f for _, f in heads), count)
        for count, heads in sorted(by_count.items())
    )
    return Piece(index, s, start, stop, r, blocks)


def _pieces_of_rank(job_index: int, job: PatternJob, m: int, n: int, rank: int) -> list[Piece]:
    W = job.segment
    first, last = (rank * m) // W, ((rank + 1) * m - 1) // W
    shared = {s for s in (first, last) if _is_shared(s, W, n, m, rank)}
    return [_piece(job_index, job, s, m, n, rank) for s in sorted(shared)]


def _interior(job: PatternJob, m: int, n: int, rank: int) -> tuple[int, int] | None:
    """Local rows of the interior segments of ``job`` on ``rank``, or ``None`` when there are none."""
    W = job.segment
    first, last = (rank * m) // W, ((rank + 1) * m - 1) // W
    if _is_shared(first, W, n, m, rank):
        first += 1
    if last >= first and _is_shared(last, W, n, m, rank):
        last -= 1
    if last < first:
        return None
    return first * W - rank * m, _segment_end(last, W, n) - rank * m


def _pairings(own: Piece, other: Piece) -> tuple[Pairing, ...]:
    where_other = {j: (bi, hi) for bi, block in enumerate(other.blocks) for hi, j in enumerate(block.heads)}
    grouped: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    for bi, block in enumerate(own.blocks):
        for hi, j in enumerate(block.heads):
            if j in where_other:
                ob, oh = where_other[j]
                mine, theirs = grouped.setdefault((bi, ob), ([], []))
                mine.append(hi)
                theirs.append(oh)
    pairings = []
    for (bi, ob), (mine, theirs) in sorted(grouped.items()):
        everyone = range(len(own.blocks[bi].heads)), range(len(other.blocks[ob].heads))
        pairings.append(
            Pairing(
                bi,
                ob,
                None if list(everyone[0]) == mine else tuple(mine),
                None if list(everyone[1]) == theirs else tuple(theirs),
            )
        )
    return tuple(pairings)


def _peers(rank: int, distance: int, world: int, causal: bool) -> tuple[list[int], list[int]]:
    """Who this rank sends to and receives from at ``distance``; causal keys only flow forward."""
    earlier, later = rank - distance, rank + distance
    send_to = [p for p in (later,) if p < world] + ([] if causal or earlier < 0 else [earlier])
    recv_from = [p for p in (earlier,) if p >= 0] + ([] if causal or later >= world else [later])
    return send_to, recv_from


_PLANS = metadata_cache("ring.rank_plans")


def rank_plan(jobs: tuple[PatternJob, ...], n_local: int, world: int, rank: int, causal: bool) -> RankPlan:
    """The plan of ``rank`` for ``jobs`` (built for the global length ``world * n_local``), cached."""
    return _PLANS.get_or_build(
        (jobs, n_local, world, rank, causal), lambda: build_rank_plan(jobs, n_local, world, rank, causal)
    )


def build_rank_plan(
    jobs: tuple[PatternJob, ...], n_local: int, world: int, rank: int, causal: bool
) -> RankPlan:
    """The plan of ``rank`` for ``jobs`` (built for the global length ``world * n_local``)."""
    m, n = n_local, world * n_local
    runs: dict[tuple[int, int], list[PatternJob]] = {}
    pieces: list[Piece] = []
    for job_index, job in enumerate(jobs):
        rows = _interior(job, m, n, rank)
        if rows is not None:
            runs.setdefault(rows, []).append(job)
        pieces.extend(_pieces_of_rank(job_index, job, m, n, rank))
    own_piece = {(p.job, p.segment): i for i, p in enumerate(pieces)}

    steps = []
    for distance in range(1, world):
        send_to, recv_from = _peers(rank, distance, world, causal)
        sends: list[Send] = []
        receipts: list[Receipt] = []
        # Both ends derive the pairings from the same two pieces, so they agree on what moves; the
        # messages between two ranks go in job order in each direction.
        for peer in send_to:
            for job_index, job in enumerate(jobs):
                s = shared_segment(job, m, world, rank, peer)
                if s is not None:
                    theirs = _piece(job_index, job, s, m, n, peer)
                    if _pairings(theirs, pieces[own_piece[job_index, s]]):
                        sends.append(Send(peer, own_piece[job_index, s]))
        for peer in recv_from:
            for job_index, job in enumerate(jobs):
                s = shared_segment(job, m, world, rank, peer)
                if s is not None:
                    remote = _piece(job_index, job, s, m, n, peer)
                    own = own_piece[job_index, s]
                    pairings = _pairings(pieces[own], remote)
                    if pairings:
                        receipts.append(Receipt(peer, remote, own, pairings))
        if sends or receipts:
            steps.append(Step(distance, tuple(sends), tuple(receipts)))
    # Longest run first: when it spans the chunk its result is the accumulator, with no copy.
    ordered = sorted(runs.items(), key=lambda item: (item[0][0] - item[0][1], item[0][0]))
    local = tuple(LocalRun(start, stop, tuple(js)) for (start, stop), js in ordered)
    return RankPlan(m, world, rank, jobs, local, tuple(pieces), tuple(steps))
