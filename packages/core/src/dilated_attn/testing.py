"""Conformance kit: the checks every attention backend must pass, against the float64 oracle.

A third-party backend runs it on itself by subclassing :class:`BackendConformance` in its tests::

    from dilated_attn.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        backend = "my_backend"
        device = "cpu"
        dtypes = (torch.float32,)

Requires pytest (only this module does): ``pip install 'dilated-attn-core[testing]'``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

try:
    import pytest
except ImportError as exc:
    raise ImportError(
        "dilated_attn.testing needs pytest, which dilated-attn-core does not install by itself: "
        "pip install 'dilated-attn-core[testing]'"
    ) from exc
import torch

from dilated_attn.functional import dilated_attention
from dilated_attn.reference import dilated_attention_reference
from dilated_attn.tolerances import TOLERANCES, relative_error

__all__ = ["CASES", "TOLERANCES", "BackendConformance", "Case", "relative_error"]


@dataclass(frozen=True)
class Case:
    """One shape and pattern to check."""

    batch: int
    seq: int
    heads: int
    head_dim: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    mode: str = "longnet"
    causal: bool = False
    # Grouped-query attention: K/V heads (dividing ``heads``); ``None`` for as many as the queries.
    kv_heads: int | None = None

    @property
    def id(self) -> str:
        w = "-".join(map(str, self.segment_lengths))
        r = "-".join(map(str, self.dilation_rates))
        return (
            f"b{self.batch}n{self.seq}h{self.heads}d{self.head_dim}-w{w}-r{r}-{self.mode}"
            f"{'-causal' if self.causal else ''}{f'-kv{self.kv_heads}' if self.kv_heads else ''}"
        )


def _cases() -> list[Case]:
    shapes = [
        # n not a multiple of any segment; r not dividing w; heads not divisible by #patterns.
        (2, 45, 5, 16, (8, 12, 24), (1, 3, 5)),
        # w > n for the largest pattern.
        (1, 50, 4, 16, (16, 128), (1, 4)),
        # no r = 1: some rows have no keys at all.
        (1, 33, 3, 16, (6, 10), (2, 3)),
        # single pattern, segment = whole sequence, dense.
        (1, 17, 2, 32, (17,), (1,)),
        # the SPEC shape family, scaled down.
        (1, 96, 4, 16, (8, 16, 32), (1, 2, 4)),
    ]
    cases = []
    for b, n, h, d, w, r in shapes:
        for mode in ("longnet", "head_groups"):
            for causal in (False, True):
                cases.append(Case(b, n, h, d, w, r, mode, causal))
    # Grouped K/V heads: r dividing the group size and not, one K/V head for all.
    for kv_heads, causal in ((2, False), (1, True)):
        cases.append(Case(1, 45, 4, 16, (8, 12), (1, 3), "longnet", causal, kv_heads))
    cases.append(Case(2, 33, 6, 16, (6, 10), (2, 3), "head_groups", True, 3))
    return cases


CASES: list[Case] = _cases()


def _inputs(case: Case, dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.seq, case.heads, case.head_dim)
    kv_shape = (case.batch, case.seq, case.kv_heads or case.heads, case.head_dim)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in (shape, kv_shape, kv_shape)]


def _ids(value: Any) -> str:
    return value.id if isinstance(value, Case) else str(value).removeprefix("torch.")


class BackendConformance:
    """Parametrised checks of one registered backend against the float64 oracle."""

    backend: ClassVar[str] = ""
    device: ClassVar[str] = "cpu"
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32,)
    backend_kwargs: ClassVar[dict[str, Any]] = {}
    check_backward: ClassVar[bool] = True

    def _run(self, case: Case, dtype: torch.dtype, seed: int) -> None:
        if dtype not in self.dtypes:
            pytest.skip(f"{self.backend} is not checked in {dtype}")
        fwd_tol, grad_tol = TOLERANCES[dtype]
        q, k, v = (t.requires_grad_(self.check_backward) for t in _inputs(case, dtype, self.device, seed))
        out, lse = dilated_attention(
            q,
            k,
            v,
            case.segment_lengths,
            case.dilation_rates,
            mode=case.mode,
            causal=case.causal,
            return_lse=True,
            backend=self.backend,
            **self.backend_kwargs,
        )
        assert out.shape == q.shape and out.dtype == dtype
        assert lse.shape == q.shape[:3]
        q64, k64, v64 = (t.detach().double().requires_grad_(self.check_backward) for t in (q, k, v))
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
        err = relative_error(out, ref_out)
        assert err <= fwd_tol, f"forward relative error {err:.3e} > {fwd_tol:g}"
        err = relative_error(lse, ref_lse)
        assert err <= fwd_tol, f"lse relative error {err:.3e} > {fwd_tol:g}"
        empty = torch.isneginf(ref_lse)
        assert torch.all(out.detach()[empty] == 0), "rows with no keys must output exactly 0"
        if not self.check_backward:
            return
        g = torch.Generator().manual_seed(seed + 1)
        grad_out = torch.randn(out.shape, generator=g).to(device=self.device, dtype=dtype)
        (out * grad_out).sum().backward()
        (ref_out * grad_out.double()).sum().backward()
        for name, ours, ref in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
            assert ours.grad is not None
            err = relative_error(ours.grad, ref.grad)  # type: ignore[arg-type]
            assert err <= grad_tol, f"d{name} relative error {err:.3e} > {grad_tol:g}"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=_ids)
    @pytest.mark.parametrize("case", CASES, ids=_ids)
    def test_matches_oracle(self, case: Case, dtype: torch.dtype) -> None:
        self._run(case, dtype, seed=zlib.crc32(f"{case.id}/{dtype}".encode()))

    @pytest.mark.parametrize(
        "segment_lengths, dilation_rates, error",
        [
            ((8, 16), (1,), ValueError),
            ((8, 0), (1, 1), ValueError),
            ((8, 16), (1, 32), ValueError),
            ((8, 16.0), (1, 2), TypeError),
            ((8, 16), (-1, 2), ValueError),
        ],
    )
    def test_bad_pattern(self, segment_lengths: Any, dilation_rates: Any, error: type) -> None:
        q = torch.randn(1, 16, 2, 8, device=self.device, dtype=self.dtypes[0])
        with pytest.raises(error):
            dilated_attention(
                q, q, q, segment_lengths, dilation_rates, backend=self.backend, **self.backend_kwargs
            )

    def test_bad_tensors(self) -> None:
        dtype = self.dtypes[0]
        q = torch.randn(1, 16, 2, 8, device=self.device, dtype=dtype)
        with pytest.raises(ValueError, match="rank 4"):
            dilated_attention(q[0], q[0], q[0], [8], [1], backend=self.backend, **self.backend_kwargs)
        with pytest.raises(ValueError, match="k.shape"):
            dilated_attention(q, q[:, :8], q, [8], [1], backend=self.backend, **self.backend_kwargs)
        other = torch.float64 if dtype != torch.float64 else torch.float32
        with pytest.raises(TypeError, match="v.dtype"):
            dilated_attention(q, q, q.to(other), [8], [1], backend=self.backend, **self.backend_kwargs)
        with pytest.raises(ValueError, match="head_dim=0"):
            z = q[..., :0]
            dilated_attention(z, z, z, [8], [1], backend=self.backend, **self.backend_kwargs)
