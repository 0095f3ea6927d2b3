"""The correctness column: relative error against the float64 oracle at a small size of a workload."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from dilated_attn.reference import dilated_attention_reference

from dilated_attn_bench.distributed import World
from dilated_attn_bench.implementations import Implementation
from dilated_attn_bench.presets import Workload

# The project's bounds (forward, gradients): a result past them is wrong, not slow.
BOUNDS: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (2e-2, 2e-2),
}

# The oracle holds several (h, n, n) float64 tensors and their autograd graph: 4096 keeps that to
# about a GB per tensor at 16 heads on a GPU, 1024 keeps a CPU check well under a second.
MAX_CHECK_LEN = {"cuda": 4096, "cpu": 1024}


@dataclass(frozen=True)
class Accuracy:
    """Relative errors ``||x - ref|| / ||ref||`` (gradients: the worst of q, k, v) at ``seq_len``."""

    seq_len: int
    forward: float
    gradients: float | None

    def violation(self, dtype: torch.dtype) -> str | None:
        """Which bound the errors break, or ``None``."""
        fwd_bound, grad_bound = BOUNDS[dtype]
        if not self.forward <= fwd_bound:
            return f"forward rel. error {self.forward:.1e} > {fwd_bound:.0e}"
        if self.gradients is not None and not self.gradients <= grad_bound:
            return f"gradient rel. error {self.gradients:.1e} > {grad_bound:.0e}"
        return None


def check_size(workload: Workload, device: torch.device, world: World) -> int:
    """The checked length: one and a half shortest segments plus one, so that the length is odd and
    the last segment partial, unless the workload is shorter or that is past the device's cap; then
    a multiple of the world size."""
    cap = MAX_CHECK_LEN.get(device.type, MAX_CHECK_LEN["cpu"])
    wanted = 3 * min(workload.segment_lengths) // 2 + 1
    n = min(workload.seq_len, wanted if wanted <= cap else cap)
    return max(world.size, n - n % world.size)


def _relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref_norm = ref.norm().item()
    return (x.double() - ref).norm().item() / (ref_norm if ref_norm > 0 else 1.0)


def measure_accuracy(
    impl: Implementation, workload: Workload, device: torch.device, world: World, *, backward: bool
) -> Accuracy:
    """Run ``impl`` and the oracle on the same fresh random inputs (batch 1, same pattern and mode).

    Every rank draws the same inputs (a fixed seed), so a distributed backend sees consistent shards.
    """
    small = dataclasses.replace(workload, batch=1, seq_len=check_size(workload, device, world))
    generator = torch.Generator(device="cpu").manual_seed(small.seq_len)
    shape = (1, small.seq_len, small.heads, small.head_dim)
    q, k, v, dout = (
        torch.randn(shape, generator=generator).to(device=device, dtype=small.dtype) for _ in range(4)
    )
    out, grads = impl.evaluate(q, k, v, dout if backward else None, small, world)

    q64, k64, v64 = (x.detach().double().requires_grad_(backward) for x in (q, k, v))
    with torch.set_grad_enabled(backward):
        ref = dilated_attention_reference(
            q64, k64, v64, small.segment_lengths, small.dilation_rates, mode=small.mode, causal=small.causal
        )
        forward_error = _relative(out, ref.detach())
        if grads is None:
            return Accuracy(small.seq_len, forward_error, None)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    grad_error = max(_relative(g, r) for g, r in zip(grads, ref_grads, strict=True))
    return Accuracy(small.seq_len, forward_error, grad_error)
