"""Registered attention backends, called through the public functional as a user would."""

from __future__ import annotations

import dilated_attn
import torch
from dilated_attn.registry import AttentionBackend, get_registry
from dilated_attn.request import Request

from dilated_attn_bench.distributed import World, gather, shard
from dilated_attn_bench.implementations import KIND_DILATED, Implementation, Prepared, random_inputs
from dilated_attn_bench.presets import Workload


class RegisteredBackend(Implementation):
    """``dilated_attention(..., backend=name)``; distributed backends get this rank's sequence shard."""

    kind = KIND_DILATED

    def __init__(self, backend: AttentionBackend) -> None:
        self.name = backend.name
        self.backend = backend
        self.distributed = backend.capabilities.distributed

    def skip_reason(self, workload: Workload, device: torch.device, world: World) -> str | None:
        caps = self.backend.capabilities
        if caps.distributed and not world.launched:
            return "needs torchrun"
        if caps.requires:
            return "needs " + ", ".join(caps.requires)
        why = caps.mismatch(
            Request(
                device=device,
                dtype=workload.dtype,
                batch=workload.batch,
                seq_len=workload.seq_len,
                num_heads=workload.heads,
                num_kv_heads=workload.heads,
                head_dim=workload.head_dim,
                mode=workload.mode,
                causal=workload.causal,
                scale=workload.head_dim**-0.5,
            )
        )
        if why is not None:
            return why
        if caps.distributed and workload.seq_len % world.size:
            return f"seq_len={workload.seq_len} is not divisible by the world size {world.size}"
        return None

    def no_backward_reason(self, device: torch.device) -> str | None:
        return None if self.backend.capabilities.backward else "backend declares backward=False"

    def flops(self, workload: Workload) -> float:
        return workload.pattern.flops(
            workload.seq_len,
            workload.heads,
            workload.head_dim,
            batch=workload.batch,
            mode=workload.mode,
            causal=workload.causal,
        )

    def _world_of(self, world: World) -> World:
        # A single-device backend sees whole sequences even when the bench runs under torchrun.
        return world if self.distributed else World()

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, workload: Workload) -> torch.Tensor:
        return dilated_attn.dilated_attention(
            q,
            k,
            v,
            workload.segment_lengths,
            workload.dilation_rates,
            mode=workload.mode,
            causal=workload.causal,
            backend=self.name,
        )

    def prepare(self, workload: Workload, device: torch.device, world: World) -> Prepared:
        local = self._world_of(world)
        shape = (workload.batch, workload.seq_len // local.size, workload.heads, workload.head_dim)
        q, k, v, dout = random_inputs(shape, workload.dtype, device)

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return self._attend(q, k, v, workload)

        def forward_backward() -> tuple[torch.Tensor, ...]:
            return torch.autograd.grad(self._attend(q, k, v, workload), (q, k, v), dout)

        return Prepared(forward, forward_backward, tokens=workload.tokens)

    def evaluate(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dout: torch.Tensor | None,
        workload: Workload,
        world: World,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        local = self._world_of(world)
        ql, kl, vl = (shard(x, local).detach().requires_grad_(dout is not None) for x in (q, k, v))
        if dout is None:
            with torch.no_grad():
                return gather(self._attend(ql, kl, vl, workload), local), None
        out = self._attend(ql, kl, vl, workload)
        grads = torch.autograd.grad(out, (ql, kl, vl), shard(dout, local))
        return gather(out.detach(), local), tuple(gather(g, local) for g in grads)


def registered_backends() -> list[RegisteredBackend]:
    """Every attention backend in the registry, in name order."""
    backends = get_registry().backends()
    return [RegisteredBackend(backends[name]) for name in sorted(backends)]
