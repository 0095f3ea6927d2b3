"""How far a result may be from the float64 oracle: the relative error and its bound per dtype.

Needs nothing beyond torch, so the conformance kit (``dilated_attn.testing``), the test suite and the
benchmarks all judge a result by the same function and the same bounds.
"""

from __future__ import annotations

import torch

# Relative-error bounds by dtype: (forward and lse, gradients).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64, with ``-inf`` entries compared exactly.

    Infinities in different places (or of different signs) give ``inf``; a NaN in ``actual`` gives
    ``nan``, which no bound accepts (``not nan <= bound``). A zero ``expected`` gives the absolute
    error.
    """
    a, e = actual.detach().double(), expected.detach().double()
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    if not torch.equal(inf_a, inf_e) or not torch.equal(a[inf_a], e[inf_e]):
        return float("inf")
    a, e = a.masked_fill(inf_a, 0.0), e.masked_fill(inf_e, 0.0)
    if torch.isnan(a).any():
        return float("nan")
    denom = e.norm().item()
    return (a - e).norm().item() / denom if denom > 0 else (a - e).norm().item()
