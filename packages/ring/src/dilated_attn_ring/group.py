"""The process group a call runs on, and the cross-rank agreement that every rank's call is valid and matches.

``group=`` takes what PyTorch's own distributed APIs take for "which ranks": a ``ProcessGroup``,
a 1-D ``DeviceMesh`` (``mesh["sp"]`` of a larger mesh, as ``context_parallel`` takes), or a
``(mesh, dim)`` pair naming one dimension of a mesh by name or index (as the functional
collectives take). ``None`` is the default (world) group.

The agreement is one small ``all_gather`` per call, run before any rank acts on what it alone
rejected: each rank checks its own arguments, catching its error, and contributes either its
call's fingerprint or a failure flag. If any rank failed, the error texts are gathered too and every
rank raises the same error naming the failing ranks; if the fingerprints differ, every rank raises
the same ``ValueError``. No rank is left waiting for a transfer that will never come.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from dilated_attn.pattern import DilationPattern

if TYPE_CHECKING:
    from typing import TypeAlias

    from torch.distributed.device_mesh import DeviceMesh

    GroupSpec: TypeAlias = "dist.ProcessGroup | DeviceMesh | tuple[DeviceMesh, int | str] | None"
    """What ``group=`` accepts."""

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MODES = ("longnet", "head_groups")
_GROUP_RULE = (
    "a torch.distributed ProcessGroup, a 1-D DeviceMesh (e.g. mesh['sp']), a (DeviceMesh, dim) pair "
    "with dim a mesh dimension name or index, or None for the default group"
)


@dataclass(frozen=True)
class GroupInfo:
    """A resolved process group: the group, its size, and this process's rank in it."""

    group: dist.ProcessGroup
    world: int
    rank: int


def _is_mesh_form(group: object) -> bool:
    from torch.distributed.device_mesh import DeviceMesh

    return isinstance(group, DeviceMesh) or (
        isinstance(group, tuple) and len(group) == 2 and isinstance(group[0], DeviceMesh)
    )


def _mesh_group(group: Any) -> dist.ProcessGroup:
    """The process group of a 1-D mesh or of one dimension of a mesh."""
    if not isinstance(group, tuple):
        if group.ndim != 1:
            names = group.mesh_dim_names
            example = f"mesh[{names[0]!r}] or (mesh, {names[0]!r})" if names else "(mesh, 0)"
            raise ValueError(
                f"group={group!r} is a {group.ndim}-D DeviceMesh: name the dimension the sequence is "
                f"split along, e.g. group={example}"
            )
        return group.get_group()
    mesh, dim = group
    if isinstance(dim, bool) or not isinstance(dim, (int, str)):
        raise TypeError(f"group=(mesh, {dim!r}): the dimension must be a mesh dimension name or index")
    names = mesh.mesh_dim_names or ()
    if isinstance(dim, str) and dim not in names:
        raise ValueError(f"group=(mesh, {dim!r}): the mesh has dimensions named {names}")
    if isinstance(dim, int) and not 0 <= dim < mesh.ndim:
        raise ValueError(f"group=(mesh, {dim}): the mesh has {mesh.ndim} dimension(s)")
    return mesh.get_group(dim)


def resolve_group(group: object) -> GroupInfo:
    """``group`` (see the module docstring) or the default group, which must be initialised."""
    if not dist.is_available():
        raise ValueError(f"group={group!r}: torch.distributed is not available in this PyTorch build")
    if group is not None and not isinstance(group, dist.ProcessGroup) and not _is_mesh_form(group):
        raise TypeError(f"group={group!r} (a {type(group).__name__}) must be {_GROUP_RULE}")
    if not dist.is_initialized():
        raise ValueError(
            f"group={group!r}: no process group is initialised; call "
            "torch.distributed.init_process_group(...) first (for example under torchrun)"
        )
    if group is None:
        resolved = dist.group.WORLD
    elif isinstance(group, dist.ProcessGroup):
        resolved = group
    else:
        resolved = _mesh_group(group)
    assert resolved is not None
    rank = dist.get_rank(resolved)
    if rank < 0:
        raise ValueError(f"group={group!r}: this process (global rank {dist.get_rank()}) is not a member")
    return GroupInfo(resolved, dist.get_world_size(resolved), rank)


def check_device(info: GroupInfo, q: torch.Tensor) -> None:
    """The chunks' device must be one the group's backend communicates on."""
    backend = str(dist.get_backend(info.group))
    if q.is_cuda and "nccl" not in backend:
        raise ValueError(
            f"q.device={q.device}: CUDA chunks need a process group with the nccl backend, got {backend!r}"
        )
    if not q.is_cuda and "gloo" not in backend:
        raise ValueError(
            f"q.device={q.device}: CPU chunks need a process group with the gloo backend, got {backend!r}"
        )


def _exchange_device(info: GroupInfo) -> torch.device:
    """Where the agreement's tensors live: decided by the group alone, so every rank picks the same
    one whatever tensors (or non-tensors) it was passed."""
    if "gloo" in str(dist.get_backend(info.group)):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _fingerprint(pattern: DilationPattern) -> int:
    return zlib.crc32(repr((pattern.segment_lengths, pattern.dilation_rates)).encode())


def _bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


# What every rank's call must agree on, in the order of :func:`call_fields`.
_FIELDS = ("batch", "n_local", "heads", "head_dim", "dtype", "mode", "causal", "pattern", "scale")


def call_fields(
    q: torch.Tensor, pattern: DilationPattern, *, mode: str, causal: bool, scale: float
) -> tuple[int, ...]:
    """This rank's call as integers, one per name in ``_FIELDS``."""
    b, n_local, h, d = q.shape
    if q.dtype not in _DTYPES:
        raise TypeError(f"q.dtype={q.dtype} must be one of {_DTYPES}")
    return (
        b,
        n_local,
        h,
        d,
        _DTYPES.index(q.dtype),
        _MODES.index(mode),
        int(causal),
        _fingerprint(pattern),
        _bits(scale),
    )


def agree(info: GroupInfo, fields: tuple[int, ...] | None, error: Exception | None) -> None:
    """Collective over ``info.group``: return on every rank, or raise the same error on every rank.

    ``fields`` is this rank's :func:`call_fields` when its own checks passed, ``error`` what they
    raised otherwise. An error on any rank is raised everywhere (``TypeError`` when every failing
    rank raised one, ``ValueError`` otherwise), naming the failing ranks and their messages.
    """
    if info.world == 1:
        if error is not None:
            raise error
        return
    row = [0, *fields] if fields is not None else [1] + [0] * len(_FIELDS)
    mine = torch.tensor(row, dtype=torch.int64, device=_exchange_device(info))
    gathered = [torch.empty_like(mine) for _ in range(info.world)]
    dist.all_gather(gathered, mine, group=info.group)
    table = torch.stack(gathered).tolist()
    if any(status for status, *_ in table):
        _raise_everywhere(info, error)
    first = table[0][1:]
    for rank, (_, *values) in enumerate(table[1:], start=1):
        for name, ours, theirs in zip(_FIELDS, first, values, strict=True):
            if theirs != ours:
                raise ValueError(_disagreement(name, ours, theirs, rank))


def _raise_everywhere(info: GroupInfo, error: Exception | None) -> None:
    """Every rank enters this together (all saw a failure flag): gather the errors, raise one."""
    mine: tuple[str, str] | None = None if error is None else (type(error).__name__, str(error))
    errors: list[Any] = [None] * info.world
    dist.all_gather_object(errors, mine, group=info.group)
    failing = [(rank, *entry) for rank, entry in enumerate(errors) if entry is not None]
    ranks = [rank for rank, _, _ in failing]
    texts = {text for _, _, text in failing}
    where = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {info.world}"
    if len(texts) == 1:
        detail = texts.pop()
    else:
        detail = "; ".join(f"rank {rank}: {text}" for rank, _, text in failing)
    cls = TypeError if all(kind == "TypeError" for _, kind, _ in failing) else ValueError
    message = f"ring_dilated_attention arguments rejected on {where} (every rank raises this): {detail}"
    raise cls(message) from error


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
