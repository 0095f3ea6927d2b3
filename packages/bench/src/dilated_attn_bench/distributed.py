"""Running under ``torchrun``: the process group, this rank's device, and sequence shards."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place: ``size == 1`` and ``launched=False`` outside ``torchrun``."""

    rank: int = 0
    size: int = 1
    launched: bool = False
    # Where collectives put their tensors: NCCL takes only CUDA tensors.
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group when launched by ``torchrun``; each rank takes GPU ``LOCAL_RANK``.

    NCCL on GPUs, gloo on CPUs. Outside ``torchrun`` nothing is initialised.
    """
    if not launched_by_torchrun():
        return World(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return World(dist.get_rank(), dist.get_world_size(), launched=True, device=device), device


def shutdown(world: World) -> None:
    if world.launched and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.launched:
        dist.barrier()


def slowest(seconds: float, world: World) -> float:
    """The largest of every rank's ``seconds``: what all ranks base a shared decision on."""
    if not world.launched:
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=world.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


def shard(x: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's contiguous slice of the sequence dimension of ``(b, n, ...)``; ``n % size == 0``."""
    if world.size == 1:
        return x
    part = x.shape[1] // world.size
    return x.narrow(1, world.rank * part, part).contiguous()


def gather(x: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate every rank's shard of ``(b, n / size, ...)`` back into ``(b, n, ...)``."""
    if world.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=1)
