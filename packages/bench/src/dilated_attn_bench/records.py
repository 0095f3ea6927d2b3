"""One record per measurement, and the JSON and CSV files that hold them."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dilated_attn_bench.presets import describe_shape

STATUS_OK = "ok"
FAILED = "failed: "
SKIPPED = "skipped: "
OUT_OF_MEMORY = "out of memory"


@dataclass
class Record:
    """One implementation on one workload.

    Times are milliseconds per call (median, p10, p90); memory is the peak in MB beyond the inputs
    (``None`` where the device keeps no peak counter); throughput counts global tokens per second;
    TFLOP/s count useful work (SPEC §3); ``*_ceiling_ratio`` divides TFLOP/s per device by the
    segment ceiling's of the same workload and phase. ``fwd_bwd_*`` is the forward+backward phase.
    """

    implementation: str
    kind: str
    preset: str
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    dtype: str
    mode: str
    causal: bool
    segment_lengths: list[int]
    dilation_rates: list[int]
    device: str
    world_size: int = 1
    status: str = STATUS_OK
    flops: float | None = None
    time_ms: float | None = None
    time_p10_ms: float | None = None
    time_p90_ms: float | None = None
    fwd_bwd_ms: float | None = None
    fwd_bwd_p10_ms: float | None = None
    fwd_bwd_p90_ms: float | None = None
    repeats: int | None = None
    fwd_bwd_repeats: int | None = None
    memory_mb: float | None = None
    reserved_mb: float | None = None
    fwd_bwd_memory_mb: float | None = None
    fwd_bwd_reserved_mb: float | None = None
    throughput_tok_s: float | None = None
    fwd_bwd_throughput_tok_s: float | None = None
    tflops: float | None = None
    fwd_bwd_tflops: float | None = None
    ceiling_ratio: float | None = None
    fwd_bwd_ceiling_ratio: float | None = None
    rel_error: float | None = None
    grad_rel_error: float | None = None
    error_seq_len: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def workload_key(self) -> tuple[Any, ...]:
        return (
            self.batch,
            self.seq_len,
            self.heads,
            self.head_dim,
            self.dtype,
            tuple(self.segment_lengths),
            tuple(self.dilation_rates),
            self.causal,
            self.mode,
        )

    def describe(self) -> str:
        """The workload, as :func:`describe_shape` spells it."""
        return describe_shape(
            self.batch, self.seq_len, self.heads, self.head_dim, self.dtype, self.mode, self.causal
        )

    def key(self) -> tuple[Any, ...]:
        """What a row of another run must share to be compared with this one."""
        return (self.implementation, *self.workload_key())


FIELDS = [f.name for f in dataclasses.fields(Record)]
# The fields without a default: a record lacking one is no record.
REQUIRED = [
    f.name
    for f in dataclasses.fields(Record)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
]


def write_json(path: Path, records: Sequence[Record], meta: dict[str, Any]) -> None:
    """``{"meta": {...}, "records": [...]}``; ``None`` becomes ``null``."""
    payload = {"meta": meta, "records": [dataclasses.asdict(r) for r in records]}
    path.write_text(json.dumps(payload, indent=1) + "\n")


def read_json(path: Path) -> tuple[list[Record], dict[str, Any]]:
    """Records and metadata of a ``results.json`` (a bare list of records is accepted too).

    Raises ``OSError`` when the file cannot be read and ``ValueError`` naming the file and what is
    wrong when it is no results file: bad JSON, no ``records`` list, a record that is no object or
    lacks a field every record has.
    """
    text = Path(path).read_text()
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if isinstance(payload, dict) and isinstance(payload.get("records"), list):
        raw, meta = payload["records"], payload.get("meta") or {}
    elif isinstance(payload, list):
        raw, meta = payload, {}
    else:
        raise ValueError(f'{path}: not a results file (expected {{"meta": ..., "records": [...]}})')
    known = set(FIELDS)
    records = []
    for number, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: record {number} is {type(item).__name__}, not an object")
        missing = [name for name in REQUIRED if name not in item]
        if missing:
            raise ValueError(f"{path}: record {number} lacks {', '.join(missing)}")
        records.append(Record(**{k: v for k, v in item.items() if k in known}))
    return records, meta


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    return value


def write_csv(path: Path, records: Sequence[Record]) -> None:
    """One row per record, the columns of :class:`Record`; missing values are empty cells."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(FIELDS)
        for record in records:
            writer.writerow([_csv_cell(getattr(record, name)) for name in FIELDS])
