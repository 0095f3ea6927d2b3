"""Non-finite inputs: a NaN (or inf) reaches exactly the outputs whose formula holds it, on every path.

Forward and LSE: a NaN in ``q`` row ``p`` makes row ``p`` NaN; one in ``k`` row ``t`` makes NaN the
rows that attend to key ``t`` (read off ``dilated_attn.reference.multiplicity`` and the padding
mask); one in ``v[t, e]`` makes column ``e`` of those rows NaN; an inf in ``q`` makes its row
non-finite. Every other output is exact (checked against the oracle on the same inputs with the
non-finite value replaced by 0, which those outputs do not read). Never a silent zero.

Gradients: the rows reached in the forward get non-finite ``dq`` (a zero would hide the NaN); on
"sdpa" the gradients of every row outside the gathered blocks (segment x dilation offset) that hold
a reached or non-finite row are exact; on "reference" (dense matmuls, where 0 * NaN spreads) those of
every other (batch, head) are.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from dilated_attn import dilated_attention
from dilated_attn.block_attention import attention_forward
from dilated_attn.pattern import DilationPattern
from dilated_attn.reference import dilated_attention_reference, multiplicity
from dilated_attn.testing import TOLERANCES, relative_error

B, N, H, D = 2, 37, 3, 8
PATTERNS = [((4, 8), (1, 2)), ((6, 16, 64), (1, 2, 4))]
KINDS = ["q_nan", "k_nan", "v_nan", "q_inf"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _ids(value: object) -> str:
    return str(value).removeprefix("torch.")


def _reach(pattern: DilationPattern, mode: str, causal: bool, mask: torch.Tensor | None) -> torch.Tensor:
    """``(b, h, n, n)`` bool: query ``p`` of head ``j`` attends to key ``t``."""
    c = multiplicity(N, H, pattern, mode, causal) > 0
    reach = c.unsqueeze(0).expand(B, H, N, N).clone()
    if mask is not None:
        reach &= ~mask[:, None, None, :]
    return reach


def _blocks(pattern: DilationPattern, mode: str) -> list[tuple[int, int, int, int]]:
    """For every (row, head): the gathered blocks that hold it, as (pattern, head, segment, offset)."""
    out = []
    for i, ((W, r), heads) in enumerate(zip(pattern.effective(N), pattern.head_sets(H, mode))):
        for j in heads:
            out.append((i, j, W, r))
    return out


def _clean_rows(tainted: torch.Tensor, pattern: DilationPattern, mode: str, backend: str) -> torch.Tensor:
    """``(b, n, h)`` bool: rows whose gradients must stay exact, given the ``(b, n, h)`` tainted rows."""
    if backend == "reference":
        return ~tainted.any(dim=1, keepdim=True).expand(B, N, H)
    dirty = torch.zeros(B, N, H, dtype=torch.bool)
    pos = torch.arange(N)
    for _, j, W, r in _blocks(pattern, mode):
        selected = (pos % W) % r == j % r
        for seg in range(0, N, W):
            rows = selected & (pos // W == seg // W)
            hit = (tainted[:, :, j] & rows).any(dim=1)  # (b,)
            dirty[:, :, j] |= hit[:, None] & rows[None, :]
    return ~dirty


def _poison(kind: str, g: torch.Generator) -> tuple[str, tuple[int, int, int, int], float]:
    b, t, j, e = (int(torch.randint(0, size, (1,), generator=g)) for size in (B, N, H, D))
    value = float("inf") if kind == "q_inf" else float("nan")
    return kind[0], (b, t, j, e), value


def _expected(
    kind: str, where: tuple[int, int, int, int], reach: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, n, h, d) outputs and (b, n, h) LSEs the non-finite value reaches."""
    b, t, j, e = where
    out = torch.zeros(B, N, H, D, dtype=torch.bool)
    lse = torch.zeros(B, N, H, dtype=torch.bool)
    if kind[0] == "q":
        if reach[b, j, t].any():
            out[b, t, j] = True
            lse[b, t, j] = True
    elif kind[0] == "k":
        rows = reach[b, j, :, t]
        out[b, rows, j] = True
        lse[b, rows, j] = True
    else:
        out[b, reach[b, j, :, t], j, e] = True
    return out, lse


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("patterns", PATTERNS, ids=lambda p: "w" + "-".join(map(str, p[0])))
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_reaches_only_its_rows(kind, patterns, padded, causal, dtype, backend):
    w, r = patterns
    pattern = DilationPattern(w, r)
    mode = "longnet" if len(w) == 2 else "head_groups"
    fwd_tol, grad_tol = TOLERANCES[dtype]
    g = torch.Generator().manual_seed(zlib.crc32(f"{kind}{w}{padded}{causal}{dtype}{backend}".encode()))
    mask = (torch.rand(B, N, generator=g) < 0.2) if padded else None
    reach = _reach(pattern, mode, causal, mask)
    for _ in range(3):
        name, where, value = _poison(kind, g)
        clean = [torch.randn(B, N, H, D, generator=g).to(dtype) for _ in range(3)]
        bad = [t.clone() for t in clean]
        bad["qkv".index(name)][where] = value
        q, k, v = (t.requires_grad_() for t in bad)
        out, lse = dilated_attention(
            q, k, v, w, r, mode=mode, causal=causal, key_padding_mask=mask, return_lse=True, backend=backend
        )
        c64 = [t.double().requires_grad_() for t in clean]
        ref, ref_lse = dilated_attention_reference(
            *c64, w, r, mode=mode, causal=causal, key_padding_mask=mask, return_lse=True
        )
        hit_out, hit_lse = _expected(kind, where, reach)
        assert torch.isnan(out[hit_out]).all(), f"{kind} at {where}: a reached output is not NaN"
        assert not torch.isfinite(lse[hit_lse]).any(), f"{kind} at {where}: a reached LSE is finite"
        assert torch.isfinite(out[~hit_out]).all(), f"{kind} at {where}: an unreached output is not finite"
        assert relative_error(out[~hit_out], ref[~hit_out]) <= fwd_tol
        assert relative_error(lse[~hit_lse], ref_lse[~hit_lse]) <= fwd_tol

        grad = torch.randn(B, N, H, D, generator=g)
        (out * grad.to(dtype)).sum().backward()
        (ref * grad.double()).sum().backward()
        reached_rows = hit_out.any(-1)
        assert not torch.isfinite(q.grad[reached_rows]).any(), "dq of a reached row is finite"
        tainted = reached_rows.clone()
        tainted[where[:3]] = True
        rows = _clean_rows(tainted, pattern, mode, backend)
        assert rows.any()
        for label, ours, theirs in (("q", q, c64[0]), ("k", k, c64[1]), ("v", v, c64[2])):
            err = relative_error(ours.grad[rows], theirs.grad[rows])
            assert err <= grad_tol, f"{kind} at {where}: d{label} of clean rows off by {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_ids)
@pytest.mark.parametrize("causal", [False, True])
def test_block_kernel_routes_non_finite_inputs_to_exact_arithmetic(dtype, causal):
    """PyTorch's CPU flash kernel returns a zero row and LSE 0 for a NaN query row, and spreads a NaN
    value into rows that cannot see its key; ``attention_forward`` must do neither, checked or told."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=g).to(dtype) for _ in range(3))
    q[0, 1, 4, 2] = float("nan")
    v[1, 0, 6, 5] = float("nan")
    for finite in (None, False):
        out, lse = attention_forward(q, k, v, causal=causal, scale=0.35, finite=finite)
        assert torch.isnan(out[0, 1, 4]).all() and torch.isnan(lse[0, 1, 4])
        seen = torch.arange(9) >= 6 if causal else torch.ones(9, dtype=torch.bool)
        assert torch.isnan(out[1, 0, seen, 5]).all()
        assert torch.isfinite(out[1, 0, ~seen]).all() and torch.isfinite(out[1, 0, :, :5]).all()
        others = torch.ones(2, 2, 9, dtype=torch.bool)
        others[0, 1, 4] = False
        assert torch.isfinite(lse[others]).all()
