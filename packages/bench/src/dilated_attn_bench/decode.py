"""Decode-step benchmark: one cached token of dilated attention vs dense SDPA over a full cache.

For each (context length, batch): a ``DilatedKVCache`` whose sequences stand at that length (rows
filled with random values: the step's cost does not depend on them), one decode step timed eagerly
and as a CUDA-graph replay, and dense decoding (``scaled_dot_product_attention`` of one query over a
full ``(b, h, n, d)`` cache, also graph-replayed) in the same process. Dense cases that do not fit the
device's free memory are reported as skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from dilated_attn.kvcache import DilatedKVCache

from dilated_attn_bench.timing import time_calls


@dataclass(frozen=True)
class DecodeRecord:
    """One (context, batch) point; times in microseconds per step, ``None`` where not run."""

    context: int
    batch: int
    heads: int
    head_dim: int
    cache_bytes_per_sequence: int
    dense_cache_bytes_per_sequence: int
    dilated_us: float
    dilated_graph_us: float | None
    dense_graph_us: float | None

    @property
    def speedup(self) -> float | None:
        if self.dense_graph_us is None or self.dilated_graph_us is None:
            return None
        return self.dense_graph_us / self.dilated_graph_us

    def tokens_per_s(self) -> float | None:
        return None if self.dilated_graph_us is None else self.batch / (self.dilated_graph_us * 1e-6)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup, "tokens_per_s": self.tokens_per_s()}


def _graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured once in a CUDA graph (after a warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _time_us(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    return time_calls(fn, device, warmup=5, repeats=repeats, budget_s=2.0).median_ms * 1e3


def measure_decode(
    contexts: Sequence[int],
    batches: Sequence[int],
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    heads: int = 16,
    head_dim: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    mode: str = "longnet",
    repeats: int = 100,
) -> list[DecodeRecord]:
    """Time one decode step per (context, batch); see the module docstring."""
    from dilated_attn.kernels.decode import decode_step

    device = torch.device(device)
    records = []
    for batch in batches:
        cache = DilatedKVCache(
            segment_lengths,
            dilation_rates,
            batch_size=batch,
            num_heads=heads,
            head_dim=head_dim,
            dtype=dtype,
            device=device,
            mode=mode,
        )
        for i in range(batch):
            cache.storage(i).normal_()
        q = torch.randn(batch, 1, heads, head_dim, device=device, dtype=dtype)
        k, v = torch.randn_like(q), torch.randn_like(q)
        scale = head_dim**-0.5
        for context in contexts:
            step = functools.partial(decode_step, q, k, v, cache, scale)
            rewind = functools.partial(cache.lengths.fill_, context)
            rewind()
            # Steps advance the lengths: every timed call starts within a few hundred tokens of context.
            eager = _time_us(step, device, repeats)
            rewind()
            graph_us = None
            if device.type == "cuda":
                replay = _graphed(step)
                rewind()
                graph_us = _time_us(replay, device, repeats)
            dense_bytes = 2 * context * heads * head_dim * dtype.itemsize
            dense_us = None
            if device.type == "cuda" and 1.1 * batch * dense_bytes < torch.cuda.mem_get_info(device)[0]:
                kd = torch.randn(batch, heads, context, head_dim, device=device, dtype=dtype)
                vd = torch.randn_like(kd)
                qd = q.transpose(1, 2)
                dense_us = _time_us(
                    _graphed(functools.partial(F.scaled_dot_product_attention, qd, kd, vd)), device, repeats
                )
                del kd, vd
            records.append(
                DecodeRecord(
                    context,
                    batch,
                    heads,
                    head_dim,
                    cache.nbytes // batch,
                    dense_bytes,
                    eager,
                    graph_us,
                    dense_us,
                )
            )
        cache.close()
    return records


def render_markdown(records: Sequence[DecodeRecord]) -> str:
    """A table: context, batch, cache MiB (ours, dense), step us (eager, graph), dense us, speedup."""
    lines = [
        "| context | batch | cache MiB/seq | dense MiB/seq | step us | step us (graph) | dense us (graph) | speedup | tokens/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    for r in records:
        lines.append(
            f"| {r.context} | {r.batch} | {r.cache_bytes_per_sequence / 2**20:.1f} | "
            f"{r.dense_cache_bytes_per_sequence / 2**20:.0f} | {r.dilated_us:.1f} | "
            f"{fmt(r.dilated_graph_us, '.1f')} | {fmt(r.dense_graph_us, '.1f')} | "
            f"{fmt(r.speedup, '.1f')} | {fmt(r.tokens_per_s(), '.3g')} |"
        )
    return "\n".join(lines)


__all__ = ["DecodeRecord", "measure_decode", "render_markdown"]


def _plot(records: Sequence[DecodeRecord], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for batch in sorted({r.batch for r in records}):
        rows = [r for r in records if r.batch == batch]
        ax.plot(
            [r.context for r in rows],
            [r.dilated_graph_us or r.dilated_us for r in rows],
            "o-",
            label=f"dilated KV cache, batch {batch}",
        )
        dense = [(r.context, r.dense_graph_us) for r in rows if r.dense_graph_us is not None]
        if dense:
            ax.plot(
                [context for context, _ in dense],
                [us for _, us in dense],
                "s--",
                label=f"dense SDPA, batch {batch}",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode step (us, CUDA graph)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    """``dilated-attn-bench decode``: measure, then write decode.md, decode.json and decode.png."""
    from dilated_attn_bench.cli import UsageError
    from dilated_attn_bench.presets import expand

    if not torch.cuda.is_available():
        raise UsageError("needs a CUDA device (the decode step runs on the Triton decode kernel)")
    (workload,) = expand([args.preset])
    args.out.mkdir(parents=True, exist_ok=True)
    records = measure_decode(
        args.contexts,
        args.batches,
        segment_lengths=workload.pattern.segment_lengths,
        dilation_rates=workload.pattern.dilation_rates,
        heads=workload.heads,
        head_dim=workload.head_dim,
        dtype=workload.dtype,
        mode=workload.mode,
        repeats=args.repeats,
    )
    table = render_markdown(records)
    device = torch.cuda.get_device_name()
    (args.out / "decode.md").write_text(
        f"# Decode step, {args.preset} ({device}, torch {torch.__version__})\n\n{table}\n"
    )
    (args.out / "decode.json").write_text(
        json.dumps(
            {"device": device, "preset": args.preset, "records": [r.as_dict() for r in records]}, indent=2
        )
    )
    _plot(records, args.out / "decode.png")
    print(table)
    return 0
