"""The process group a call runs on, and the cross-rank agreement that every rank's call matches.

The check is one small ``all_gather`` per call: every rank compares every other rank's shapes,
dtype and arguments, so all of them raise the same error instead of deadlocking in a transfer.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from dilated_attn.pattern import DilationPattern

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MODES = ("longnet", "head_groups")


@dataclass(frozen=True)
class GroupInfo:
    """A resolved process group: the group, its size, and this process's rank in it."""

    group: dist.ProcessGroup
    world: int
    rank: int


def resolve_group(group: dist.ProcessGroup | None) -> GroupInfo:
    """``group`` or the default group, which must be initialised."""
    if not dist.is_available():
        raise ValueError(f"group={group!r}: torch.distributed is not available in this PyTorch build")
    if not dist.is_initialized():
        raise ValueError(
            f"group={group!r}: no process group is initialised; call "
            "torch.distributed.init_process_group(...) first (for example under torchrun)"
        )
    resolved = dist.group.WORLD if group is None else group
    assert resolved is not None
    rank = dist.get_rank(resolved)
    if rank < 0:
        raise ValueError(f"group={group!r}: this process (global rank {dist.get_rank()}) is not a member")
    return GroupInfo(resolved, dist.get_world_size(resolved), rank)


def _device_for(info: GroupInfo, q: torch.Tensor) -> torch.device:
    backend = str(dist.get_backend(info.group))
    if q.is_cuda and "nccl" not in backend:
        raise ValueError(
            f"q.device={q.device}: CUDA chunks need a process group with the nccl backend, got {backend!r}"
        )
    if not q.is_cuda and "gloo" not in backend:
        raise ValueError(
            f"q.device={q.device}: CPU chunks need a process group with the gloo backend, got {backend!r}"
        )
    return q.device


def _fingerprint(pattern: DilationPattern) -> int:
    return zlib.crc32(repr((pattern.segment_lengths, pattern.dilation_rates)).encode())


def _bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def check_agreement(
    info: GroupInfo,
    q: torch.Tensor,
    pattern: DilationPattern,
    *,
    mode: str,
    causal: bool,
    scale: float,
) -> None:
    """Raise the same ``ValueError`` on every rank unless all ranks pass matching calls."""
    device = _device_for(info, q)
    b, n_local, h, d = q.shape
    fields = {
        "batch": b,
        "n_local": n_local,
        "heads": h,
        "head_dim": d,
        "dtype": _DTYPES.index(q.dtype),
        "mode": _MODES.index(mode),
        "causal": int(causal),
        "pattern": _fingerprint(pattern),
        "scale": _bits(scale),
    }
    if info.world == 1:
        return
    mine = torch.tensor(list(fields.values()), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(info.world)]
    dist.all_gather(gathered, mine, group=info.group)
    table = torch.stack(gathered).tolist()
    names = list(fields)
    for rank, row in enumerate(table[1:], start=1):
        for col, name in enumerate(names):
            if row[col] != table[0][col]:
                raise ValueError(_disagreement(name, table[0][col], row[col], rank))


def _disagreement(name: str, first: int, other: int, rank: int) -> str:
    if name == "n_local":
        return (
            f"n_local={other} on rank {rank} but n_local={first} on rank 0: every rank must hold a "
            "chunk of the same length (q, k, v of shape (b, n_local, h, d))"
        )
    if name == "dtype":
        return (
            f"dtype={_DTYPES[other]} on rank {rank} but dtype={_DTYPES[first]} on rank 0: every rank "
            "must pass q, k, v of one dtype"
        )
    if name == "mode":
        return f"mode={_MODES[other]!r} on rank {rank} but mode={_MODES[first]!r} on rank 0: modes must match"
    if name == "causal":
        return f"causal={bool(other)} on rank {rank} but causal={bool(first)} on rank 0: causal must match"
    if name == "pattern":
        return (
            f"segment_lengths/dilation_rates on rank {rank} differ from rank 0: every rank must pass "
            "the same pattern"
        )
    if name == "scale":
        theirs, ours = (struct.unpack("<d", struct.pack("<q", x))[0] for x in (other, first))
        return f"scale={theirs} on rank {rank} but scale={ours} on rank 0: scale must match"
    return (
        f"{name}={other} on rank {rank} but {name}={first} on rank 0: every rank must pass q, k, v "
        "chunks of the same (batch, heads, head_dim)"
    )
