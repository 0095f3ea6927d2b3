"""Forward+backward peak memory beyond the inputs: core ``auto`` on one GPU against the ring on every
GPU, with a pattern spanning them (longnet-1m + ``w = n, r = 64``).

    torchrun --nproc-per-node 2 ring_memory.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from dilated_attn import dilated_attention
from dilated_attn_ring import ring_dilated_attention

W, R = (2048, 4096, 8192, 16384, 32768, 1 << 40), (1, 2, 4, 8, 16, 64)


def peak_mib(fn: Callable[..., torch.Tensor], shape: tuple[int, ...]) -> float:
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    fn(q, k, v).backward(dout)  # tuned and planned outside the measurement
    torch.cuda.synchronize()
    q.grad = k.grad = v.grad = None
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(q, k, v).backward(dout)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    for m in (16384, 65536):
        shape = (1, m, 16, 64)
        core = peak_mib(lambda q, k, v: dilated_attention(q, k, v, W, R), shape)
        ring = peak_mib(lambda q, k, v: ring_dilated_attention(q, k, v, W, R), shape)
        print(
            f"rank {rank} n_local {m}: fwd+bwd peak beyond inputs: core 1 GPU {core:.1f} MiB, "
            f"ring {dist.get_world_size()} GPUs (spanning) {ring:.1f} MiB, ratio {ring / core:.3f}",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
