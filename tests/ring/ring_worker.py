"""One rank of the distributed ring tests: runs every case of a suite for its world size over gloo.

Launched ``world`` times by ``test_ring_distributed.py`` (``RANK``/``WORLD_SIZE`` in the
environment, a file store for the rendezvous, the suite named on the command line: "oracle", every
geometry plus the error, module and mesh cases; "fused", with ``TRITON_INTERPRET=1`` so the local runs
take the fused kernels; "worlds", a few cases at world sizes 2 to 8). Every rank builds the same
global inputs from the case's seed and passes its chunk; global rank 0 gathers the chunks, runs the
float64 oracle on the whole sequence (forward and all three gradients, with a gradient flowing into
``lse`` too) and writes the relative errors of every case to a JSON file.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Case:
    """One call of ``ring_dilated_attention`` on every rank, compared with the oracle."""

    n_local: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    heads: int
    mode: str
    causal: bool
    dtype: str = "float64"
    batch: int = 1
    head_dim: int = 8
    # "world": the default group; "strided": groups {0, 2} and {1, 3}; "single": one group per rank.
    groups: str = "world"


# name -> (n_local, segment_lengths, dilation_rates, heads)
GEOMETRIES: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], int]] = {
    # Every W divides n_local (W = n_local for the last): all local, no transfers.
    "dividing": (12, (4, 6, 12), (1, 2, 3), 3),
    # W < n_local but not dividing it: segments cross chunk edges.
    "unaligned": (7, (3, 5), (1, 2), 3),
    # W = n_local next to a smaller W.
    "equal": (8, (8, 4), (2, 1), 3),
    # W > n_local: segments span 2..4 ranks, unaligned, the last one partial.
    "larger": (6, (9, 12, 20), (1, 2, 3), 3),
    # W = n: one segment spans every rank.
    "whole": (5, (2, 1000), (1, 3), 4),
    # No r = 1: some rows have no keys at all.
    "no-r1": (7, (6, 10), (2, 3), 3),
    # r close to the piece length: heads without rows on some ranks, pairings of head subsets.
    "sparse-heads": (5, (16, 40), (8, 5), 5),
    # The same pattern twice: keys reached by both count twice.
    "repeated": (6, (8, 8, 3), (2, 2, 1), 2),
    # A local pattern over the whole chunk, and one whose segments span two ranks merged into it.
    "spanning": (8, (4, 16), (1, 2), 2),
}

VARIANTS = [(mode, causal) for mode in ("longnet", "head_groups") for causal in (False, True)]


def _name(geometry: str, mode: str, causal: bool, extra: str = "") -> str:
    return f"{geometry}-{mode}{'-causal' if causal else ''}{extra}"


def cases(world: int) -> dict[str, Case]:
    """Every case run by a launch of ``world`` ranks."""
    out: dict[str, Case] = {}
    for geometry, (m, w, r, h) in GEOMETRIES.items():
        for mode, causal in VARIANTS:
            batch = 2 if geometry in ("larger", "unaligned") and causal else 1
            out[_name(geometry, mode, causal)] = Case(m, w, r, h, mode, causal, batch=batch)
    for geometry in ("unaligned", "larger"):
        m, w, r, h = GEOMETRIES[geometry]
        for mode, causal in VARIANTS:
            out[_name(geometry, mode, causal, "-float32")] = Case(m, w, r, h, mode, causal, "float32")
    m, w, r, h = GEOMETRIES["larger"]
    out["larger-longnet-causal-bfloat16"] = Case(m, w, r, h, "longnet", True, "bfloat16", head_dim=16)
    # One local run over the whole chunk with pieces merged into it: the chunk's output and gradients
    # stay 16-bit and the pieces merge in place (float32 piece accumulators, one rounding per merge).
    m, w, r, h = GEOMETRIES["spanning"]
    for dtype in ("bfloat16", "float16"):
        for mode, causal in VARIANTS:
            out[_name("spanning", mode, causal, f"-{dtype}")] = Case(
                m, w, r, h, mode, causal, dtype, 2, head_dim=16
            )
    if world == 4:
        out["larger-longnet-causal-strided"] = Case(m, w, r, h, "longnet", True, groups="strided")
        out["larger-head_groups-strided"] = Case(m, w, r, h, "head_groups", False, groups="strided")
    if world == 2:
        m, w, r, h = GEOMETRIES["unaligned"]
        out["unaligned-longnet-causal-single"] = Case(m, w, r, h, "longnet", True, groups="single")
    return out


# Cases of the "fused" suite, run with TRITON_INTERPRET=1 so that the local runs take the fused
# kernels on CPU tensors (float32, head_dim 16): geometries with local runs over the whole chunk,
# partial runs next to pieces, and a pattern whose segments span ranks next to a local one.
FUSED_GEOMETRIES = ("dividing", "unaligned", "spanning", "whole")


def fused_cases(world: int) -> dict[str, Case]:
    """Every case of the "fused" suite (the same at every world size)."""
    out: dict[str, Case] = {}
    for geometry in FUSED_GEOMETRIES:
        m, w, r, h = GEOMETRIES[geometry]
        for mode, causal in VARIANTS:
            batch = 2 if geometry in ("unaligned", "spanning") else 1
            out[_name(geometry, mode, causal)] = Case(m, w, r, h, mode, causal, "float32", batch, head_dim=16)
    return out


# Cases of the "worlds" suite, run at world sizes 2, 3, 4 and 8: longnet-1m's shape at toy size
# (every w divides n_local), the same with a whole-sequence pattern added, and unaligned segments.
def world_cases(world: int) -> dict[str, Case]:
    """Every case of the "worlds" suite."""
    geometries = {
        "longnet-like": (16, (4, 8, 16), (1, 2, 4), 4),
        "longnet-like-whole": (16, (4, 8, 16, 1 << 20), (1, 2, 4, 8), 4),
        "unaligned": (7, (5, 12), (1, 3), 3),
    }
    out: dict[str, Case] = {}
    for geometry, (m, w, r, h) in geometries.items():
        for causal in (False, True):
            out[_name(geometry, "longnet", causal)] = Case(m, w, r, h, "longnet", causal)
    m, w, r, h = geometries["longnet-like-whole"]
    out[_name("longnet-like-whole", "head_groups", True)] = Case(m, w, r, h, "head_groups", True)
    return out


SUITES = {"oracle": cases, "fused": fused_cases, "worlds": world_cases}


# name -> (the class every rank must raise, substrings of the one message every rank raises).
# "last" below is the last rank of the group; the others pass valid, matching arguments.
ERROR_CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    # Valid on every rank, different across ranks: caught by comparing fingerprints.
    "n_local-differs": ("ValueError", ("n_local",)),
    "heads-differ": ("ValueError", ("heads",)),
    "dtype-differs": ("ValueError", ("dtype",)),
    "causal-differs": ("ValueError", ("causal",)),
    # Rejected by one rank's own checks: every rank must raise that rank's error.
    "rate-exceeds-segment": ("ValueError", ("rank {last} of", "dilation_rates")),
    "qkv-dtypes-differ": ("TypeError", ("rank {last} of", "v.dtype=torch.float32 must equal q.dtype")),
    "shape-wrong": ("ValueError", ("rank {last} of", "k.shape=(1, 3, 3, 8) must equal q.shape=(1, 4, 3, 8)")),
    "tensor-rank-wrong": ("ValueError", ("rank {last} of", "it must have rank 4")),
    "causal-not-bool": ("TypeError", ("rank {last} of", "causal='yes' must be a bool")),
    "scale-nan-on-rank-0": ("ValueError", ("rank 0 of", "scale=nan must be a finite positive number")),
    # Two ranks fail differently: one error naming both, a ValueError as the kinds differ.
    "two-ranks-fail": ("ValueError", ("ranks 0, {last} of", "rank 0: ", "mode=", "rank {last}: ", "v.dtype")),
}


def _group_layout(kind: str, world: int) -> list[list[int]]:
    if kind == "world":
        return [list(range(world))]
    if kind == "strided":
        return [list(range(start, world, 2)) for start in range(2)]
    if kind == "single":
        return [[r] for r in range(world)]
    raise ValueError(f"groups={kind!r}")


def _inputs(case: Case, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (case.batch, n, case.heads, case.head_dim)
    # q, k, v, the gradient reaching out, the gradient reaching lse
    tensors = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]
    tensors.append(torch.randn(shape[:3], generator=g, dtype=torch.float64))
    return tensors


def _loss(out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(lse)
    return (out.double() * dout).sum() + (torch.where(finite, lse.double(), 0.0) * dlse).sum()


def _run_case(name: str, case: Case, groups: dict[str, list[tuple[list[int], Any]]]) -> Any:
    from dilated_attn_ring import ring_dilated_attention

    rank = dist.get_rank()
    index, (members, group) = next((i, g) for i, g in enumerate(groups[case.groups]) if rank in g[0])
    position = members.index(rank)
    n = case.n_local * len(members)
    seed = (sum(map(ord, name)) * 1009 + index) % (2**31)
    q64, k64, v64, dout, dlse = _inputs(case, n, seed)
    rows = slice(position * case.n_local, (position + 1) * case.n_local)
    dtype = getattr(torch, case.dtype)
    q, k, v = (t[:, rows].to(dtype).requires_grad_() for t in (q64, k64, v64))
    out, lse = ring_dilated_attention(
        q,
        k,
        v,
        case.segment_lengths,
        case.dilation_rates,
        group=None if case.groups == "world" else group,
        mode=case.mode,
        causal=case.causal,
        return_lse=True,
    )
    _loss(out, lse, dout[:, rows], dlse[:, rows]).backward()
    grads = [t.grad for t in (q, k, v)]
    assert all(g is not None for g in grads), "every input must receive a gradient"
    return index, position, [out.detach(), lse.detach(), *grads], _local_runs(case, len(members), position)


def _local_runs(case: Case, world: int, rank: int) -> int:
    """Local runs in the plan of ``rank`` of ``world`` for ``case``."""
    from dilated_attn.pattern import DilationPattern, jobs_for
    from dilated_attn_ring.plan import build_rank_plan

    pattern = DilationPattern(case.segment_lengths, case.dilation_rates)
    jobs = jobs_for(pattern, world * case.n_local, case.heads, case.mode)
    return len(build_rank_plan(jobs, case.n_local, world, rank, case.causal).local)


class FusedCalls:
    """Counts the calls of the fused kernels' job entry points (one per local run and pass)."""

    def __init__(self) -> None:
        from dilated_attn.kernels import jobs

        self.forward = self.backward = 0
        forward, backward = jobs.fused_forward, jobs.fused_backward

        def counted_forward(*args: Any, **kwargs: Any) -> Any:
            self.forward += 1
            return forward(*args, **kwargs)

        def counted_backward(*args: Any, **kwargs: Any) -> Any:
            self.backward += 1
            return backward(*args, **kwargs)

        jobs.fused_forward = counted_forward  # type: ignore[assignment]
        jobs.fused_backward = counted_backward  # type: ignore[assignment]


def _oracle_errors(name: str, case: Case, parts: list[Any], layout: list[list[int]]) -> dict[str, Any]:
    from dilated_attn.reference import dilated_attention_reference
    from dilated_attn.testing import relative_error

    worst: dict[str, float] = {}
    control = 0.0
    for index, members in enumerate(layout):
        mine = sorted((p for p in parts if p[0] == index), key=lambda p: p[1])
        got = [torch.cat([p[2][i] for p in mine], dim=1) for i in range(5)]
        n = case.n_local * len(members)
        seed = (sum(map(ord, name)) * 1009 + index) % (2**31)
        q64, k64, v64, dout, dlse = _inputs(case, n, seed)
        q64, k64, v64 = (t.to(getattr(torch, case.dtype)).double().requires_grad_() for t in (q64, k64, v64))
        ref_out, ref_lse = dilated_attention_reference(
            q64,
            k64,
            v64,
            case.segment_lengths,
            case.dilation_rates,
            mode=case.mode,
            causal=case.causal,
            return_lse=True,
        )
        _loss(ref_out, ref_lse, dout, dlse).backward()
        expected = [ref_out, ref_lse, q64.grad, k64.grad, v64.grad]
        for key, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
            worst[key] = max(worst.get(key, 0.0), relative_error(a, e))
        # Negative control: the same outputs against the oracle with causality flipped must differ.
        flipped = dilated_attention_reference(
            q64.detach(),
            k64.detach(),
            v64.detach(),
            case.segment_lengths,
            case.dilation_rates,
            mode=case.mode,
            causal=not case.causal,
        )
        control = max(control, relative_error(got[0], flipped))
    return {"case": asdict(case), "errors": worst, "control": control}


def _run_error_case(name: str, group: Any) -> tuple[str, str]:
    from dilated_attn_ring import ring_dilated_attention

    rank, world = dist.get_rank(), dist.get_world_size()
    last = rank == world - 1
    m, h, dtype, causal, rates, mode = 4, 3, torch.float64, False, [1], "longnet"
    q = k = v = torch.randn(1, m, h, 8, dtype=dtype)
    kwargs: dict[str, Any] = {}
    if name == "n_local-differs" and last:
        q = k = v = torch.randn(1, 5, h, 8, dtype=dtype)
    if name == "heads-differ" and last:
        q = k = v = torch.randn(1, m, 2, 8, dtype=dtype)
    if name == "dtype-differs" and last:
        q = k = v = q.float()
    if name == "causal-differs" and last:
        causal = True
    if name == "rate-exceeds-segment" and last:
        rates = [8]
    if name in ("qkv-dtypes-differ", "two-ranks-fail") and last:
        v = v.float()
    if name == "shape-wrong" and last:
        k = k[:, :3]
    if name == "tensor-rank-wrong" and last:
        q = q[0]
    if name == "causal-not-bool" and last:
        kwargs["causal"] = "yes"
    if name == "scale-nan-on-rank-0" and rank == 0:
        kwargs["scale"] = float("nan")
    if name == "two-ranks-fail" and rank == 0:
        mode = "dense"
    kwargs.setdefault("causal", causal)
    try:
        ring_dilated_attention(q, k, v, [6], rates, group=group, mode=mode, **kwargs)
    except Exception as exc:  # recorded and judged by the test
        return type(exc).__name__, str(exc)
    return "", ""


def _run_module_case() -> dict[str, Any]:
    """``MultiheadDilatedAttention(backend="ring")`` against one process with the oracle backend."""
    from dilated_attn import MultiheadDilatedAttention
    from dilated_attn.testing import relative_error

    rank, world = dist.get_rank(), dist.get_world_size()
    m, w, r, h = GEOMETRIES["larger"]
    embed = 4 * h
    torch.manual_seed(5)
    ring = MultiheadDilatedAttention(embed, h, w, r, backend="ring", dtype=torch.float64)
    full = MultiheadDilatedAttention(embed, h, w, r, backend="reference", dtype=torch.float64)
    full.load_state_dict(ring.state_dict())
    x = torch.randn(2, m * world, embed, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    rows = slice(rank * m, (rank + 1) * m)
    chunk = x[:, rows].clone().requires_grad_()
    out, _ = ring(chunk, is_causal=True)
    out.square().sum().backward()
    grad_w = ring.q_proj.weight.grad
    assert grad_w is not None
    # Sequence parallel: parameter gradients are sums over the ranks' chunks.
    dist.all_reduce(grad_w)
    outs = [torch.empty_like(out) for _ in range(world)]
    grads = [torch.empty_like(chunk) for _ in range(world)]
    dist.all_gather(outs, out.detach())
    dist.all_gather(grads, chunk.grad)  # type: ignore[arg-type]
    whole = x.clone().requires_grad_()
    ref, _ = full(whole, is_causal=True)
    ref.square().sum().backward()
    return {
        "errors": {
            "out": relative_error(torch.cat(outs, dim=1), ref),
            "dx": relative_error(torch.cat(grads, dim=1), whole.grad),  # type: ignore[arg-type]
            "dW_q": relative_error(grad_w, full.q_proj.weight.grad),  # type: ignore[arg-type]
        }
    }


# label -> (the mesh dimension the sequence is split along, how group= names it, causal)
MESH_CASES: dict[str, tuple[str, str, bool]] = {
    "submesh": ("sp", "mesh['sp']", True),
    "pair-by-name": ("sp", "(mesh, 'sp')", False),
    "pair-by-index": ("sp", "(mesh, 1)", True),
    "split-along-dp": ("dp", "(mesh, 'dp')", True),
}

# group= forms that name no group (message substring each rank must raise).
BAD_GROUPS: dict[str, tuple[str, str]] = {
    "a-string": (
        "TypeError",
        "group='sp' (a str) must be a torch.distributed ProcessGroup, a 1-D DeviceMesh",
    ),
    "rank-list": ("TypeError", "group=[0, 1] (a list) must be"),
    "2d-mesh": ("ValueError", "is a 2-D DeviceMesh: name the dimension the sequence is split along"),
    "unknown-dim-name": ("ValueError", "group=(mesh, 'tp'): the mesh has dimensions named ('dp', 'sp')"),
    "dim-out-of-range": ("ValueError", "group=(mesh, 2): the mesh has 2 dimension(s)"),
    "dim-not-int-or-str": (
        "TypeError",
        "group=(mesh, 1.5): the dimension must be a mesh dimension name or index",
    ),
}


def _run_mesh_cases() -> dict[str, Any]:
    """A 2 x 2 (dp, sp) mesh: each dp replica has its own batch, its sequence split along one dim.

    Each rank compares its rows with the float64 oracle on its replica's whole sequence, forward
    and the gradients of q, k, v (a loss over all rows of the replica, each rank holding its part).
    """
    from dilated_attn.reference import dilated_attention_reference
    from dilated_attn.testing import relative_error
    from dilated_attn_ring import ring_dilated_attention
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "sp"))
    forms = {
        "mesh['sp']": mesh["sp"],
        "(mesh, 'sp')": (mesh, "sp"),
        "(mesh, 1)": (mesh, 1),
        "(mesh, 'dp')": (mesh, "dp"),
    }
    m, w, r, h = GEOMETRIES["larger"]
    report: dict[str, Any] = {}
    for label, (split, form, causal) in MESH_CASES.items():
        other = "dp" if split == "sp" else "sp"
        replica, position, parts = mesh.get_local_rank(other), mesh.get_local_rank(split), mesh[split].size()
        case = Case(m, w, r, h, "longnet", causal, batch=2)
        q64, k64, v64, dout, dlse = _inputs(case, m * parts, seed=1000 + replica)
        rows = slice(position * m, (position + 1) * m)
        q, k, v = (t[:, rows].clone().requires_grad_() for t in (q64, k64, v64))
        out, lse = ring_dilated_attention(q, k, v, w, r, group=forms[form], causal=causal, return_lse=True)
        _loss(out, lse, dout[:, rows], dlse[:, rows]).backward()
        q64, k64, v64 = (t.requires_grad_() for t in (q64, k64, v64))
        ref_out, ref_lse = dilated_attention_reference(q64, k64, v64, w, r, causal=causal, return_lse=True)
        _loss(ref_out, ref_lse, dout, dlse).backward()
        got = (out, lse, q.grad, k.grad, v.grad)
        expected = (ref_out, ref_lse, q64.grad, k64.grad, v64.grad)
        errors = {
            key: relative_error(a, e[:, rows])  # type: ignore[index]
            for key, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, expected)
        }
        # Negative control: another replica's rows (its own data) must not match.
        control = relative_error(
            out,
            dilated_attention_reference(
                *_inputs(case, m * parts, seed=1000 + 1 - replica)[:3], w, r, causal=causal
            )[:, rows],
        )
        report[label] = {"errors": errors, "control": control}
    bad = {
        "a-string": "sp",
        "rank-list": [0, 1],
        "2d-mesh": mesh,
        "unknown-dim-name": (mesh, "tp"),
        "dim-out-of-range": (mesh, 2),
        "dim-not-int-or-str": (mesh, 1.5),
    }
    q = torch.randn(1, m, h, 8, dtype=torch.float64)
    for label, group in bad.items():
        try:
            ring_dilated_attention(q, q, q, w, r, group=group)
            report[f"bad:{label}"] = ("", "")
        except Exception as exc:  # judged by the test
            report[f"bad:{label}"] = (type(exc).__name__, str(exc))
    return report


def main() -> None:
    store, out_path, suite = sys.argv[1], sys.argv[2], sys.argv[3]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    import dilated_attn_ring.plugin
    from dilated_attn import registry

    registry.get_registry().register(dilated_attn_ring.plugin, "ring")

    groups: dict[str, list[tuple[list[int], Any]]] = {}
    for kind in ("world", "strided", "single"):
        if kind == "strided" and world % 2:
            continue
        layout = _group_layout(kind, world)
        groups[kind] = [(members, dist.new_group(members)) for members in layout]

    calls = FusedCalls() if suite == "fused" else None
    results: dict[str, Any] = {}
    for name, case in SUITES[suite](world).items():
        before = (calls.forward, calls.backward) if calls else (0, 0)
        try:
            part = _run_case(name, case, groups)
            failure = ""
        except Exception:  # reported per case; the others still run
            part, failure = None, traceback.format_exc()
        fused = (calls.forward - before[0], calls.backward - before[1]) if calls else (0, 0)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (part, failure, fused))
        if rank == 0:
            failures = [f for _, f, _ in gathered if f]
            if failures:
                results[name] = {"failure": failures[0]}
            else:
                parts = [p for p, _, _ in gathered]
                layout = _group_layout(case.groups, world)
                results[name] = _oracle_errors(name, case, parts, layout)
                results[name]["fused_calls"] = [sum(g[2][i] for g in gathered) for i in range(2)]
                results[name]["local_runs"] = sum(p[3] for p in parts)
    if suite != "oracle":
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f, indent=1)
        dist.destroy_process_group()
        return

    # A short timeout: a rank left waiting for one that gave up fails in seconds with a timeout
    # error (not the ValueError the test wants) instead of hanging the launch.
    impatient = dist.new_group(list(range(world)), timeout=timedelta(seconds=10))
    for name in ERROR_CASES:
        raised: list[Any] = [None] * world
        dist.all_gather_object(raised, _run_error_case(name, impatient))
        results[f"error:{name}"] = {"raised": raised}

    if world == 4:
        mesh_report: list[Any] = [None] * world
        try:
            mine: Any = _run_mesh_cases()
        except Exception:
            mine = {"failure": traceback.format_exc()}
        dist.all_gather_object(mesh_report, mine)
        results["mesh"] = mesh_report

    try:
        results["module"] = _run_module_case()
    except Exception:
        results["module"] = {"failure": traceback.format_exc()}

    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
