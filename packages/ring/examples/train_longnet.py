"""Train a ``LongNetLM`` with its sequence split across ranks (ring attention) and FSDP2 on the model.

    torchrun --nproc-per-node 2 train_longnet.py --device cuda --dtype bfloat16 --seq-len 2097152
    torchrun --nproc-per-node 4 train_longnet.py --device cpu --dp 2 --seq-len 256 --steps 3

The ranks form a ``(dp, sp)`` mesh: each data-parallel replica trains on its own batch, and the
``sp`` ranks of a replica each hold one contiguous chunk of its sequence (``seq_len / sp`` tokens at
positions ``rank_in_sp * chunk ..``). Attention is exact over the whole sequence through
``backend="ring"`` on ``mesh["sp"]``; everything else in the model is per token, so it runs on the
chunk alone. FSDP2 (``fully_shard``) shards every block and the model over all ``dp * sp`` ranks.

Each rank's loss is its chunk's share of its replica's mean next-token loss (summed over the chunk,
divided by the replica's ``batch * seq_len`` tokens), so a replica's gradient is the *sum* over its
``sp`` ranks, and the step's gradient the *mean* over replicas: FSDP2's reduce-scatter sums over
all ranks and divides by ``dp`` (``set_gradient_divide_factor``), not by the world size.

Tokens are synthetic (seeded per step and replica); targets are the next tokens, so each rank reads
one token past its chunk. ``--report PATH`` saves the per-step losses and the full parameter
gradients of every step (``torch.save``) from rank 0, for checking against one process.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from dilated_attn.models import LongNetLM
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (NCCL) or cpu (gloo)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter dtype")
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas; sp = world / dp")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence, split across sp ranks")
    p.add_argument("--batch", type=int, default=1, help="sequences per replica and step")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--segment-lengths", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--dilation-rates", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, help="torch.save losses and full gradients here (rank 0)")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, **attention: Any) -> LongNetLM:
    """The model, initialised from ``args.seed`` (identical on every rank and in one process)."""
    torch.manual_seed(args.seed)
    model = LongNetLM(
        args.vocab,
        args.embed_dim,
        args.layers,
        args.heads,
        args.segment_lengths,
        args.dilation_rates,
        **attention,
    )
    return model.to(DTYPES[args.dtype])


def batch_tokens(args: argparse.Namespace, step: int, replica: int) -> torch.Tensor:
    """``(batch, seq_len + 1)`` tokens of one replica's step: inputs ``[:, :-1]``, targets ``[:, 1:]``."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + replica)
    return torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=g)


def chunk_loss(
    model: torch.nn.Module, tokens: torch.Tensor, start: int, stop: int, device: torch.device
) -> torch.Tensor:
    """Summed next-token loss of positions ``[start, stop)``, over the replica's token count."""
    inputs = tokens[:, start:stop].to(device)
    targets = tokens[:, start + 1 : stop + 1].to(device)
    logits = model(inputs, position_offset=start)
    # The softmax in float32 at least (bfloat16 logits lose the loss's small differences).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    return loss / targets.shape[0] / (tokens.shape[1] - 1)


def full_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient, on the CPU (FSDP2 holds them as DTensors sharded over ranks)."""
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            raise RuntimeError(f"parameter {name} received no gradient")
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[name] = grad.detach().cpu()
    return grads


def _meshes(args: argparse.Namespace, world: int) -> tuple[DeviceMesh, DeviceMesh]:
    if args.dp < 1 or world % args.dp:
        raise SystemExit(f"error: --dp {args.dp} must divide the world size {world}")
    sp = world // args.dp
    if args.seq_len % sp:
        raise SystemExit(f"error: --seq-len {args.seq_len} must be a multiple of sp = {sp}")
    mesh = init_device_mesh(args.device, (args.dp, sp), mesh_dim_names=("dp", "sp"))
    # FSDP2 shards over every rank (ZeRO-3 across dp and sp together).
    shard_mesh = init_device_mesh(args.device, (world,), mesh_dim_names=("shard",))
    return mesh, shard_mesh


def train(args: argparse.Namespace) -> list[float]:
    """Run ``args.steps`` optimizer steps; returns the global loss of each step (on every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh, shard_mesh = _meshes(args, world)
    sp_mesh = mesh["sp"]
    replica, position, sp = mesh.get_local_rank("dp"), mesh.get_local_rank("sp"), sp_mesh.size()
    device = (
        torch.device(args.device, torch.cuda.current_device())
        if args.device == "cuda"
        else torch.device("cpu")
    )

    model = build_model(args, backend="ring", group=sp_mesh).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum over the sp ranks (each holds part of a replica's loss), mean over the replicas.
            module.set_gradient_divide_factor(float(args.dp))
            if args.device == "cpu":
                # Gloo has no pre-multiplied sum: reduce with a plain sum, then divide.
                module.set_force_sum_reduction_for_comms(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    chunk = args.seq_len // sp
    start, stop = position * chunk, (position + 1) * chunk
    losses: list[float] = []
    grads: list[dict[str, torch.Tensor]] = []
    for step in range(args.steps):
        tokens = batch_tokens(args, step, replica)
        loss = chunk_loss(model, tokens, start, stop, device)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / args.dp)
        if args.report:
            grads.append(full_gradients(model))
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step}: loss {losses[-1]:.6f}", flush=True)
    if args.report and rank == 0:
        torch.save({"loss": losses, "grads": grads}, args.report)
    return losses


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if len(args.segment_lengths) != len(args.dilation_rates):
        raise SystemExit("error: --segment-lengths and --dilation-rates must have the same length")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda needs CUDA; use --device cpu")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        train(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
