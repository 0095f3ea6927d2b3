"""Peak device memory of a phase beyond what was live when it started (the inputs)."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

MB = 2**20


@dataclass
class PeakMemory:
    """Peak MB allocated and reserved beyond the starting point; ``None`` where not measurable (CPU)."""

    allocated_mb: float | None = None
    reserved_mb: float | None = None


@contextmanager
def peak_memory(device: torch.device) -> Iterator[PeakMemory]:
    """Measure the peak of the enclosed block from ``torch.cuda.max_memory_*``.

    The CPU allocator keeps no peak counter, so on a CPU both fields stay ``None`` (reported "n/a",
    never 0). The cache is emptied first so that "reserved" counts what the block made the allocator
    reserve, not blocks left over from an earlier row.
    """
    result = PeakMemory()
    if device.type != "cuda":
        yield result
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base_allocated = torch.cuda.memory_allocated(device)
    base_reserved = torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield result
    torch.cuda.synchronize(device)
    result.allocated_mb = (torch.cuda.max_memory_allocated(device) - base_allocated) / MB
    result.reserved_mb = (torch.cuda.max_memory_reserved(device) - base_reserved) / MB


def release(device: torch.device) -> None:
    """Return freed memory after a row (a failed row may leave cycles through its traceback)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_capacity_bytes(device: torch.device) -> int:
    """Total memory of the device: the GPU's, or the host's physical memory for a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
