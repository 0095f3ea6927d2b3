"""Where a run happened: date, git commit, hardware, library versions, registered plugins."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import dilated_attn
import torch
from dilated_attn.registry import get_registry


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def git_commit(given: str | None = None) -> tuple[str, bool]:
    """``given``, else the short commit of the working directory's checkout (``"nogit"`` outside
    one), and whether tracked files have uncommitted changes."""
    if given:
        return given, False
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        return "nogit", False
    return commit, bool(_git("status", "--porcelain", "--untracked-files=no"))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
        return f"{world_size} x {name}" if world_size > 1 else name
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{_cpu_model()}, {cores} cores"


def default_output_dir(commit: str | None = None, today: datetime.date | None = None) -> Path:
    """``bench-results/<YYYY-MM-DD>-<git short commit>``."""
    today = today or datetime.date.today()
    commit, _ = git_commit(commit)
    return Path("bench-results") / f"{today.isoformat()}-{commit}"


def describe(device: torch.device, world_size: int, commit: str | None = None) -> dict[str, Any]:
    """The run's metadata, as written at the top of the report and under ``meta`` in results.json."""
    commit, dirty = git_commit(commit)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    plugins = {}
    for backend in get_registry().backends().values():
        source = backend.source
        plugins[backend.name] = " ".join(
            p for p in (source.distribution or source.plugin, source.version) if p
        )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": commit + (" (with uncommitted changes)" if dirty else ""),
        "hardware": hardware(device, world_size),
        "device": str(device),
        "world_size": world_size,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "dilated_attn": dilated_attn.__version__,
        "backends": plugins,
    }
