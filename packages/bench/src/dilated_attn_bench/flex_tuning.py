"""``flex-tuning``: a sweep of FlexAttention kernel options for block-sparse attention, on one GPU.

Measures dense SDPA (cuDNN, flash) once, then for each pattern kind (``local_window``,
``dilated_blocks``, ``random_blocks``) sized to the block density, times ``block_sparse_attention``
under each candidate ``kernel_options``:

- forward candidates (``fwd_`` keys, ``USE_TMA``): the forward alone;
- backward candidates (``bwd_`` keys, ``WRITE_DQ``, ``USE_TMA``; forward tiles left to the default):
  the forward, and forward + backward;
- ``--extra-options`` candidates: both;
- then, per kind, the best forward options merged with the best backward options, when the best
  forward options are not the defaults (``--no-combine`` leaves it out).

Each timing is reported as ``time / (dense cuDNN time x block density)`` (flash when cuDNN does not
run), the ratio whose target is <= 1.3; forward times are taken with inputs that require grad. See
``dilated_attn_bench.sparse``, whose helpers this study uses.

    dilated-attn-bench flex-tuning --out flex_tuning.json --md flex_tuning.md

The full sweep (3 kinds, 8 + 7 candidates, one compile each) may not fit in ``--max-seconds``
(default 420): past it, the candidates left are recorded as ``skipped: time limit``. Split it with
``--kinds`` and ``--candidates`` (and ``--dense-from`` to reuse the dense timings of an earlier run).
Every candidate runs under try/except: options that this torch version rejects, or kernels that fail
to compile, are recorded with their error and the sweep goes on. Each result is compared with the
default options' output and gradients (``err_vs_default``, relative L2): a candidate past 2e-2
computes something else, is marked suspect and never chosen as the best. The JSON file is rewritten
after every timing, and one line is printed (flushed) per candidate, so a run cut short still leaves
its results.

``--device cpu`` runs the same steps at a toy size (n=1024, block 128, h=2, d=16), where FlexAttention
runs eagerly and ignores the kernel options: a smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from dilated_attn.tolerances import TOLERANCES, relative_error
from dilated_attn_sparse import SparsePattern, block_sparse_attention

from dilated_attn_bench import sparse as bench
from dilated_attn_bench.cli import UsageError, writable_file

FWD_CANDIDATES: list[dict[str, Any]] = [
    {},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 8},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_stages": 2, "fwd_num_warps": 8},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 4, "fwd_num_warps": 4},
    {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_stages": 4, "fwd_num_warps": 8},
    {"USE_TMA": True},
    {"USE_TMA": True, "fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4},
]

# Backward tiles: the kernel requires BLOCK_N1 % BLOCK_M1 == 0 and BLOCK_M2 % BLOCK_N2 == 0, and the
# sparse block (128) a multiple of each. USE_TMA without a prefix applies to the forward kernel too.
BWD_CANDIDATES: list[dict[str, Any]] = [
    {},
    {
        "bwd_BLOCK_M1": 64,
        "bwd_BLOCK_N1": 64,
        "bwd_BLOCK_M2": 64,
        "bwd_BLOCK_N2": 64,
        "bwd_num_stages": 3,
        "bwd_num_warps": 4,
    },
    {
        "bwd_BLOCK_M1": 64,
        "bwd_BLOCK_N1": 128,
        "bwd_BLOCK_M2": 128,
        "bwd_BLOCK_N2": 64,
        "bwd_num_stages": 2,
        "bwd_num_warps": 8,
    },
    {
        "bwd_BLOCK_M1": 32,
        "bwd_BLOCK_N1": 128,
        "bwd_BLOCK_M2": 128,
        "bwd_BLOCK_N2": 32,
        "bwd_num_stages": 3,
        "bwd_num_warps": 4,
    },
    {
        "bwd_BLOCK_M1": 64,
        "bwd_BLOCK_N1": 64,
        "bwd_BLOCK_M2": 64,
        "bwd_BLOCK_N2": 64,
        "bwd_num_stages": 4,
        "bwd_num_warps": 4,
    },
    {
        "bwd_BLOCK_M1": 64,
        "bwd_BLOCK_N1": 128,
        "bwd_BLOCK_M2": 128,
        "bwd_BLOCK_N2": 64,
        "bwd_num_stages": 3,
        "bwd_num_warps": 8,
        "WRITE_DQ": False,
    },
    {"USE_TMA": True},
]

# What each group times: the forward, or the forward and forward + backward.
GROUP_TIMINGS = {
    "fwd": ("fwd",),
    "bwd": ("fwd", "fwdbwd"),
    "extra": ("fwd", "fwdbwd"),
    "combined": ("fwd", "fwdbwd"),
}
# The groups competing for the best forward (those that set forward options), and forward + backward.
FWD_GROUPS = ("fwd", "extra")
FWDBWD_GROUPS = ("bwd", "extra", "combined")
CPU_DEFAULTS = {"n": 1024, "heads": 2, "head_dim": 16}
CUDA_DEFAULTS = {"n": 262_144, "heads": 16, "head_dim": 64}


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill the shape arguments left unset with the device's defaults."""
    defaults = CPU_DEFAULTS if args.device == "cpu" else CUDA_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.densities = args.density


class Candidate(NamedTuple):
    group: str  # "fwd", "bwd", "extra" or "combined"
    number: int  # position in its group
    options: dict[str, Any] | None  # None: a combined candidate not resolved yet


def candidate_plan(args: argparse.Namespace) -> list[Candidate]:
    """The candidates run for each (kind, density), in order."""
    limit = args.max_candidates
    plan: list[Candidate] = []
    if args.candidates in ("fwd", "both"):
        plan += [Candidate("fwd", i, dict(o)) for i, o in enumerate(FWD_CANDIDATES[:limit])]
    if args.candidates in ("bwd", "both"):
        plan += [Candidate("bwd", i, dict(o)) for i, o in enumerate(BWD_CANDIDATES[:limit])]
    plan += [Candidate("extra", i, dict(o)) for i, o in enumerate(args.extra_options)]
    if not args.no_combine and args.candidates == "both":
        plan.append(Candidate("combined", 0, None))
    return plan


def flex_default_configs(head_dim: int, n: int, dtype: torch.dtype) -> dict[str, Any]:
    """The configs Inductor picks for FlexAttention when no option pins them (best effort: private API)."""
    try:
        from torch._inductor.choices import InductorChoices

        choices: Any = InductorChoices()  # its signatures change between torch versions
        try:
            fwd = choices.get_flex_attention_fwd_configs(head_dim, n, dtype, "cuda")
        except TypeError:  # versions without the sequence-length argument
            fwd = choices.get_flex_attention_fwd_configs(head_dim, dtype, "cuda")
        bwd = choices.get_flex_attention_bwd_configs(head_dim, dtype, "cuda")
        return {"fwd": [repr(c) for c in fwd], "bwd": [repr(c) for c in bwd]}
    except Exception as exc:  # noqa: BLE001 - informational only
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cuda_usable(device: torch.device) -> bool:
    """False when the CUDA context no longer runs kernels (after an illegal access, say)."""
    if device.type != "cuda":
        return True
    try:
        torch.ones(1, device=device).add_(1)
        torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001
        return False
    return True


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:3000]


class Case:
    """One (kind, density): the pattern, its block density, and the default options' results."""

    def __init__(
        self, kind: str, density: float, tensors: tuple[torch.Tensor, ...], args: argparse.Namespace
    ) -> None:
        self.kind, self.target_density, self.tensors, self.args = kind, density, tensors, args
        q = tensors[0]
        _, n, h, _ = q.shape
        self.pattern: SparsePattern
        self.pattern, self.params = bench.sized_pattern(kind, density, n, args.block_size)
        stats = self.pattern.stats(n, num_heads=h, block_size=args.block_size, device=q.device)
        self.density: float = stats.density
        self.reference: dict[str, torch.Tensor] | None = None
        self.reference_error: str | None = None

    def forward(self, options: dict[str, Any] | None) -> Callable[[], torch.Tensor]:
        q, k, v, _ = self.tensors
        pattern, block = self.pattern, self.args.block_size

        def run() -> torch.Tensor:
            out = block_sparse_attention(q, k, v, pattern, block_size=block, kernel_options=options or None)
            assert isinstance(out, torch.Tensor)
            return out

        return run

    def step(self, options: dict[str, Any] | None) -> Callable[[], tuple[torch.Tensor, ...]]:
        q, k, v, dout = self.tensors
        forward = self.forward(options)

        def run() -> tuple[torch.Tensor, ...]:
            out = forward()
            return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))

        return run

    def compare(self, results: dict[str, torch.Tensor]) -> dict[str, float]:
        """Relative differences from the default options' output (and gradients, when given)."""
        grads = "dq" in results
        if self.reference is None or (grads and "dq" not in self.reference):
            if self.reference_error is not None:
                return {}
            try:  # computed on first need: a forward-only sweep never compiles the default backward
                if grads:
                    out, dq, dk, dv = self.step(None)()
                    self.reference = {"out": out, "dq": dq, "dk": dk, "dv": dv}
                else:
                    self.reference = {"out": self.forward(None)().detach()}
            except Exception as exc:  # noqa: BLE001
                self.reference_error = error_text(exc)
                return {}
        return {name: relative_error(t, self.reference[name]) for name, t in results.items()}

    def drop_reference(self) -> None:
        self.reference = None


def run_candidate(
    case: Case,
    cand: Candidate,
    record: dict[str, Any],
    dense_ms: dict[str, float],
    device: torch.device,
    budget: float,
    save: Callable[[], None],
) -> None:
    """Times the candidate into ``record`` (saved after each timing); errors are recorded, not raised."""
    options = record["options"] or {}  # a combined candidate is resolved into the record
    errors: dict[str, float] = {}
    try:
        for timing in GROUP_TIMINGS[cand.group]:
            if timing == "fwd":
                result = bench.measure(case.forward(options), device, budget)
            else:
                result = bench.measure(case.step(options), device, budget)
            record[timing] = result
            if timing in dense_ms and case.density > 0:
                record[f"{timing}_ratio"] = result["ms"] / (dense_ms[timing] * case.density)
            save()
        # One more call, outside the timings, to compare with the default options.
        if "fwdbwd" in GROUP_TIMINGS[cand.group]:
            out, dq, dk, dv = case.step(options)()
            errors = case.compare({"out": out, "dq": dq, "dk": dk, "dv": dv})
            del out, dq, dk, dv
        else:
            out = case.forward(options)().detach()
            errors = case.compare({"out": out})
            del out
        record["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - one candidate must not end the sweep
        record["status"] = "error"
        record["error"] = error_text(exc)
    if case.reference_error is not None:
        record["reference_error"] = case.reference_error
    if errors:
        record["err_vs_default"] = errors
        bound = max(TOLERANCES[torch.bfloat16])
        record["suspect"] = any(not (e <= bound) for e in errors.values())
    free_memory(device)


def best(records: list[dict[str, Any]], timing: str, groups: tuple[str, ...]) -> dict[str, Any] | None:
    usable = [
        r
        for r in records
        if r.get("status") == "ok" and not r.get("suspect") and timing in r and r["group"] in groups
    ]
    return min(usable, key=lambda r: r[timing]["ms"], default=None)


def describe(options: dict[str, Any] | None) -> str:
    if options is None:
        return "-"
    if not options:
        return "defaults"
    return ", ".join(f"{k}={v}" for k, v in options.items())


def line(record: dict[str, Any]) -> str:
    head = f"{record['kind']:14s} {record['density']:6.2%} {record['group']:8s} {describe(record['options'])}"
    if record["status"] != "ok":
        return f"{head}: {record.get('error') or record['status']}"[:400]
    parts = [
        f"{name} {record[name]['ms']:8.2f} ms (x{record.get(name + '_ratio', math.nan):.2f}, first call {record[name]['first_call_s']:.1f} s)"
        for name in ("fwd", "fwdbwd")
        if name in record
    ]
    errs = record.get("err_vs_default", {})
    worst = max(errs.values(), default=math.nan)
    flag = "  SUSPECT" if record.get("suspect") else ""
    return f"{head}: {'  '.join(parts)}  max err vs default {worst:.1e}{flag}"


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| pattern | options | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio | note |",
        "|---|---|---|---|---|---|---|",
    ]
    cases: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in records:
        cases.setdefault((r["kind"], r["target_density"]), []).append(r)
    for rows in cases.values():
        best_fwd = best(rows, "fwd", FWD_GROUPS)
        best_bwd = best(rows, "fwdbwd", FWDBWD_GROUPS)
        for r in rows:
            notes = []
            if r is best_fwd:
                notes.append("**best fwd**")
            if r is best_bwd:
                notes.append("**best fwd+bwd**")
            if r.get("suspect"):
                notes.append("suspect: differs from defaults")
            if r["status"] != "ok":
                notes.append((r.get("error") or r["status"]).splitlines()[0][:120].replace("|", "/"))

            def cell(name: str, r: dict[str, Any] = r) -> tuple[str, str]:
                if name not in r:
                    return "", ""
                return f"{r[name]['ms']:.2f}", f"{r.get(name + '_ratio', math.nan):.2f}"

            fwd_ms, fwd_ratio = cell("fwd")
            bwd_ms, bwd_ratio = cell("fwdbwd")
            pattern = f"{r['kind']} ({r['density']:.2%})"
            lines.append(
                f"| {pattern} | {r['group']}: {describe(r['options'])} | {fwd_ms} | {fwd_ratio} "
                f"| {bwd_ms} | {bwd_ratio} | {'; '.join(notes)} |"
            )
    return "\n".join(lines)


def open_case(
    kind: str,
    density: float,
    tensors: tuple[torch.Tensor, ...],
    args: argparse.Namespace,
    report: dict[str, Any],
) -> tuple[Case | None, str | None]:
    """The pattern and its block density; or the error that stopped it."""
    try:
        case = Case(kind, density, tensors, args)
    except Exception as exc:  # noqa: BLE001
        return None, error_text(exc)
    report.setdefault("cases", []).append(
        {
            "kind": kind,
            "target_density": density,
            "params": case.params,
            "pattern": repr(case.pattern),
            "density": case.density,
        }
    )
    return case, None


def combined_options(records: list[dict[str, Any]]) -> dict[str, Any] | str:
    """The best forward options merged with the best backward ones, or why there is nothing to run."""
    fwd_best = best(records, "fwd", ("fwd",))
    bwd_best = best(records, "fwdbwd", ("bwd",))
    if fwd_best is None or bwd_best is None:
        return "not run: no usable forward or backward candidate"
    if not fwd_best["options"]:
        return "not run: the best forward options are the defaults"
    options = {**fwd_best["options"], **bwd_best["options"]}
    for r in records:
        if r["options"] == options and "fwdbwd" in r:
            return f"not run: same options as {r['group']} candidate {r['index']}"
    return options


def dense_reference(report: dict[str, Any]) -> tuple[str | None, dict[str, float]]:
    reference = next((name for name, r in report["dense"].items() if "error" not in r), None)
    if reference is None:
        return None, {}
    r = report["dense"][reference]
    return reference, {"fwd": r["fwd"]["ms"], "fwdbwd": r["fwdbwd"]["ms"]}


def main(args: argparse.Namespace) -> int:
    """The ``flex-tuning`` command (arguments parsed by ``dilated_attn_bench.cli``)."""
    start = time.perf_counter()
    resolve_defaults(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device=cuda: no CUDA device is available (use --device cpu for a smoke run)")
    writable_file("--out", args.out)
    if args.md is not None:
        writable_file("--md", args.md)
    earlier: dict[str, Any] | None = None
    if args.dense_from is not None:
        try:
            earlier = json.loads(args.dense_from.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--dense-from={str(args.dense_from)!r}: cannot read it ({exc})") from None
        if not isinstance(earlier, dict) or not isinstance(earlier.get("dense"), dict):
            raise UsageError(f"--dense-from={str(args.dense_from)!r}: no 'dense' timings in it")
    dtype = torch.bfloat16
    environment = bench.environment(device)
    if device.type == "cuda":
        environment["flex_default_configs"] = flex_default_configs(args.head_dim, args.n, dtype)
    report: dict[str, Any] = {
        "environment": environment,
        "config": {
            "n": args.n,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "batch": 1,
            "dtype": "bfloat16",
            "block_size": args.block_size,
            "causal": False,
            "densities": args.densities,
            "kinds": args.kinds,
            "budget_s": args.budget,
            "max_seconds": args.max_seconds,
            "forward_timed_with_grad_enabled_inputs": True,
            "ratio": "time / (dense reference time x block density)",
            "target": bench.TARGET,
        },
        "records": [],
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))

    tensors = bench.inputs(args.n, args.heads, args.head_dim, dtype, device, seed=0)
    for t in tensors[:3]:
        t.requires_grad_()
    if earlier is not None:
        report["dense"] = earlier["dense"]
        report["dense_from"] = str(args.dense_from)
        print(f"dense timings from {args.dense_from}", flush=True)
    else:
        report["dense"] = bench.dense_timings(tensors, device, args.budget)
    reference, dense_ms = dense_reference(report)
    report["ratio_reference"] = reference
    save()
    sys.stdout.flush()

    plan = candidate_plan(args)
    total = len(plan) * len(args.kinds) * len(args.densities)
    print(f"{total} candidate runs planned; no new candidate after {args.max_seconds:.0f} s", flush=True)
    stop: str | None = None
    records: list[dict[str, Any]] = report["records"]
    for kind in args.kinds:
        for density in args.densities:
            case: Case | None = None
            case_error: str | None = None
            case_records: list[dict[str, Any]] = []
            for cand in plan:
                record: dict[str, Any] = {
                    "kind": kind,
                    "target_density": density,
                    "density": density if case is None else case.density,
                    "group": cand.group,
                    "index": cand.number,
                    "options": cand.options,
                    "status": "running",
                }
                records.append(record)
                case_records.append(record)
                if stop is None and time.perf_counter() - start > args.max_seconds:
                    stop = "skipped: time limit"
                if stop is None and case is None and case_error is None:
                    case, case_error = open_case(kind, density, tensors, args, report)
                    if case is not None:
                        record["density"] = case.density
                if stop is not None or case is None:
                    record["status"] = stop or "error"
                    if case is None and stop is None:
                        record["error"] = case_error
                elif cand.group == "combined":
                    options = combined_options(case_records)
                    if isinstance(options, str):
                        record["status"] = options
                    else:
                        record["options"] = options
                if record["status"] == "running" and case is not None:
                    run_candidate(case, cand, record, dense_ms, device, args.budget, save)
                    if record["status"] == "error" and not cuda_usable(device):
                        stop = "skipped: CUDA context lost"
                print(line(record), flush=True)
                save()
            if case is not None:
                case.drop_reference()
            del case
            free_memory(device)

    report["elapsed_s"] = time.perf_counter() - start
    report["best"] = []
    for kind in args.kinds:
        for density in args.densities:
            rows = [r for r in records if r["kind"] == kind and r["target_density"] == density]
            for timing, groups in (
                ("fwd", FWD_GROUPS),
                ("fwdbwd", FWDBWD_GROUPS),
            ):
                b = best(rows, timing, groups)
                if b is not None:
                    report["best"].append(
                        {
                            "kind": kind,
                            "target_density": density,
                            "timing": timing,
                            "options": b["options"],
                            "ms": b[timing]["ms"],
                            "ratio": b.get(f"{timing}_ratio"),
                        }
                    )
    save()
    summary = table(records)
    print()
    print(
        f"{environment.get('gpu', device.type)}, torch {torch.__version__}, bf16, b=1, h={args.heads}, "
        f"d={args.head_dim}, n={args.n}, block {args.block_size}; ratio = time / ({reference} time x block "
        f"density), target <= {bench.TARGET}; {report['elapsed_s']:.0f} s"
    )
    print(summary, flush=True)
    if args.md is not None:
        args.md.write_text(summary + "\n")
    return 0
