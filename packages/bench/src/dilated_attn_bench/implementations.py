"""What a benchmark row runs: an implementation, prepared on its inputs for one workload."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dilated_attn_bench.distributed import World
from dilated_attn_bench.presets import Workload

KIND_DILATED = "dilated"
KIND_BASELINE = "baseline"


@dataclass
class Prepared:
    """Closures over inputs already allocated on the device, so that timing excludes allocation.

    ``forward()`` runs without autograd; ``forward_backward()`` runs the forward and the gradients
    of all inputs for a fixed random output gradient. ``tokens`` is the number of (global) tokens one
    call processes.
    """

    forward: Callable[[], Any]
    forward_backward: Callable[[], Any]
    tokens: int


class Implementation(ABC):
    """One column of the comparison: a registered dilated backend or a bench baseline."""

    name: str
    kind: str
    # Quadratic in the sequence length (dense attention): subject to ``--dense-max-seq``.
    quadratic: bool = False
    distributed: bool = False

    def skip_reason(self, workload: Workload, device: torch.device, world: World) -> str | None:
        """Why this implementation cannot run ``workload`` here (without trying), or ``None``."""
        return None

    def no_backward_reason(self, device: torch.device) -> str | None:
        """Why forward+backward cannot be timed here, or ``None`` when it can."""
        return None

    @abstractmethod
    def flops(self, workload: Workload) -> float:
        """FLOPs of one forward call over the whole (global) workload."""

    @abstractmethod
    def prepare(self, workload: Workload, device: torch.device, world: World) -> Prepared:
        """Allocate this rank's inputs for ``workload`` and return the closures to time."""

    def evaluate(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dout: torch.Tensor | None,
        workload: Workload,
        world: World,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The output ``(b, n, h, d)`` and, given ``dout``, the gradients of ``q, k, v`` on full inputs.

        Only dilated implementations compute the dilated function; baselines raise.
        """
        raise NotImplementedError(f"{self.name} computes another function than dilated attention")


def random_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Four standard-normal tensors: q, k, v (requiring grad) and the output gradient."""
    tensors = [torch.randn(shape, dtype=dtype, device=device) for _ in range(4)]
    for t in tensors[:3]:
        t.requires_grad_(True)
    return tensors
