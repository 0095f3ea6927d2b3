"""The baselines every run reports beside the dilated backends (SPEC §3).

- ``dense-sdpa-<backend>``: full attention over the whole sequence, one row per SDPA kernel, so a
  dilated result can be read against the best dense kernel of the same process.
- ``segment-ceiling``: SDPA over a batch of independent 2048-token segments with the same tokens and
  heads, the same shape of work as one dilated pattern; dilated TFLOP/s are reported as a ratio to it.
- ``dense-flex``: full attention through compiled FlexAttention (CUDA only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from dilated_attn_bench.distributed import World
from dilated_attn_bench.implementations import KIND_BASELINE, Implementation, Prepared, random_inputs
from dilated_attn_bench.presets import Workload

SEGMENT = 2048

SDPA_KERNELS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# PyTorch ships CPU kernels for these two only; the others exist on CUDA.
_CPU_KERNELS = ("flash", "math")

CEILING = "segment-ceiling"


def dense_flops(batch: int, heads: int, seq_len: int, head_dim: int, causal: bool) -> float:
    """``4 b h n^2 d``, halved when causal: two matmuls of ``2 n^2 d`` per head."""
    flops = 4.0 * batch * heads * seq_len**2 * head_dim
    return flops / 2 if causal else flops


def _closures(
    attend: Callable[..., torch.Tensor],
    shape: tuple[int, ...],
    workload: Workload,
    device: torch.device,
    tokens: int,
) -> Prepared:
    """Inputs drawn as ``(b, n, h, d)`` like the dilated backends' and viewed as SDPA's ``(b, h, n, d)``."""
    leaves = random_inputs(shape, workload.dtype, device)
    q, k, v, dout = (x.transpose(1, 2) for x in leaves)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return attend(q, k, v)

    def forward_backward() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(attend(q, k, v), leaves[:3], dout)

    return Prepared(forward, forward_backward, tokens=tokens)


class DenseSdpa(Implementation):
    """Dense ``scaled_dot_product_attention`` restricted to one SDPA kernel."""

    kind = KIND_BASELINE
    quadratic = True

    def __init__(self, kernel: str) -> None:
        self.kernel = kernel
        self.name = f"dense-sdpa-{kernel}"

    def skip_reason(self, workload: Workload, device: torch.device, world: World) -> str | None:
        if device.type == "cpu" and self.kernel not in _CPU_KERNELS:
            return f"SDPA has no {self.kernel} kernel on cpu"
        return None

    def flops(self, workload: Workload) -> float:
        return dense_flops(
            workload.batch, workload.heads, workload.seq_len, workload.head_dim, workload.causal
        )

    def prepare(self, workload: Workload, device: torch.device, world: World) -> Prepared:
        kernel = SDPA_KERNELS[self.kernel]

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel(kernel):
                return F.scaled_dot_product_attention(q, k, v, is_causal=workload.causal)

        shape = (workload.batch, workload.seq_len, workload.heads, workload.head_dim)
        return _closures(attend, shape, workload, device, workload.tokens)


def ceiling_shape(workload: Workload) -> tuple[int, int]:
    """``(segments, segment_length)``: enough ``min(2048, n)``-token segments to cover ``b * n`` tokens."""
    length = min(SEGMENT, workload.seq_len)
    return math.ceil(workload.tokens / length), length


class SegmentCeiling(Implementation):
    """SDPA (default kernel choice) on ``(segments, 2048, h, d)``: the best case of one pattern."""

    kind = KIND_BASELINE
    name = CEILING

    def flops(self, workload: Workload) -> float:
        segments, length = ceiling_shape(workload)
        return dense_flops(segments, workload.heads, length, workload.head_dim, workload.causal)

    def prepare(self, workload: Workload, device: torch.device, world: World) -> Prepared:
        segments, length = ceiling_shape(workload)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=workload.causal)

        shape = (segments, length, workload.heads, workload.head_dim)
        return _closures(attend, shape, workload, device, segments * length)


def _causal(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    return q_idx >= kv_idx


class DenseFlex(Implementation):
    """Dense attention through ``torch.compile(flex_attention)``, on CUDA."""

    kind = KIND_BASELINE
    quadratic = True
    name = "dense-flex"

    def __init__(self) -> None:
        self._compiled: Callable[..., Any] | None = None

    def skip_reason(self, workload: Workload, device: torch.device, world: World) -> str | None:
        if device.type != "cuda":
            # Eager flex_attention traces its mask for seconds per shape and has no backward here;
            # compiling it for the CPU takes longer than the whole CPU run may.
            return "FlexAttention is only fused (compiled) on CUDA here"
        return None

    def flops(self, workload: Workload) -> float:
        return dense_flops(
            workload.batch, workload.heads, workload.seq_len, workload.head_dim, workload.causal
        )

    def _kernel(self) -> Callable[..., Any]:
        if self._compiled is None:
            # Eager flex_attention materialises the score matrix; only the compiled kernel is fused.
            self._compiled = torch.compile(flex_attention, dynamic=False)
        return self._compiled

    def prepare(self, workload: Workload, device: torch.device, world: World) -> Prepared:
        kernel = self._kernel()
        n = workload.seq_len
        block_mask: BlockMask | None = (
            create_block_mask(_causal, None, None, n, n, device=device) if workload.causal else None
        )

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return kernel(q, k, v, block_mask=block_mask)

        shape = (workload.batch, n, workload.heads, workload.head_dim)
        return _closures(attend, shape, workload, device, workload.tokens)


def dense_baselines() -> list[Implementation]:
    """One dense row per SDPA kernel, then FlexAttention."""
    return [*(DenseSdpa(kernel) for kernel in SDPA_KERNELS), DenseFlex()]
