"""Point-to-point transfers of one step: posted as one batch, waited on after overlapping compute."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


class Transfer:
    """Sends and receives posted together with ``batch_isend_irecv``; peers are group ranks.

    Every rank posts its transfers in the same step order, so each pair of ranks matches its
    messages in order. The tensors must stay untouched until :meth:`wait` returns.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        sends: Sequence[tuple[torch.Tensor, int]],
        recvs: Sequence[tuple[torch.Tensor, int]],
    ) -> None:
        ops = [
            dist.P2POp(dist.isend, tensor, dist.get_global_rank(group, peer), group) for tensor, peer in sends
        ]
        ops += [
            dist.P2POp(dist.irecv, tensor, dist.get_global_rank(group, peer), group) for tensor, peer in recvs
        ]
        self._works = dist.batch_isend_irecv(ops) if ops else []
        # Held until the transfers finish: a buffer freed earlier could be handed out again by the
        # CUDA caching allocator while the communication stream still reads or writes it.
        self._tensors = [tensor for tensor, _ in (*sends, *recvs)]

    def wait(self) -> None:
        """Block (gloo) or order the current stream (NCCL) after every transfer of the batch."""
        for work in self._works:
            work.wait()
        self._works = []
        self._tensors = []
