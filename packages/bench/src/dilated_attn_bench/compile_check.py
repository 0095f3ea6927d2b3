"""``compile-check``: compile every autotuning candidate for a GPU target without a GPU, and report what came out.

    dilated-attn-bench compile-check [--arch 90]

For each kernel and candidate tile: registers, spilled bytes (stack), shared memory and whether the
block products use wgmma. Integer arguments that can be 1 at run time are compiled as the constant 1
too, as Triton's specialisation does. Needs the ``ptxas``/``cuobjdump`` that ship with Triton, not a
GPU. A compile check, not a speed measurement.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from typing import Any

import triton
from dilated_attn.kernels.backward import _dkdv_kernel, _dq_kernel
from dilated_attn.kernels.forward import _fwd_kernel
from dilated_attn.kernels.tuning import _CANDIDATES, _FLOAT32
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNELS = {"forward": _fwd_kernel, "dkdv": _dkdv_kernel, "dq": _dq_kernel}
# Arguments that the launchers pass as Python ints; strides are multiples of 16 elements.
_STRIDES = (
    "stride_b",
    "stride_n",
    "stride_h",
    "kv_stride_b",
    "kv_stride_n",
    "lse_stride_b",
    "lse_stride_n",
    "lse_stride_h",
    "acc_stride_b",
)
_MAY_BE_ONE = (
    "tune_class",
    "num_heads",
    "lse_stride_n",
    "lse_stride_h",
    "head0",
    "max_rows",
    "seq_len",
    "segment",
    "num_segments",
)
_FLAGS = ("USE_TMA",)


def _signature(kernel: Any, dtype: str, constants: dict[str, Any]) -> dict[str, str]:
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in ("LSE", "DELTA", "DQACC"):
            signature[name] = "*fp32"
        elif name.isupper():
            signature[name] = f"*{dtype}"
        elif name in ("qk_scale", "scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def compile_one(
    kernel: Any,
    dtype: str,
    head_dim: int,
    tile: tuple[int, int, int, int],
    arch: int,
    ones: bool,
    flags: tuple[str, ...] = (),
    group: int = 1,
) -> dict[str, Any]:
    block_m, block_n, warps, stages = tile
    constants: dict[str, Any] = dict(
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim,
        GROUP=group,
        CAUSAL=True,
        ACCUMULATE=True,
        DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    # Variant switches (USE_TMA; DQ_BULK: the dK/dV kernel's dQ by tile reductions): off unless in ``flags``.
    constants.update({name: name in flags for name in _FLAGS if name in kernel.arg_names})
    if "DQ_MODE" in kernel.arg_names:
        constants["DQ_MODE"] = 2 if "DQ_BULK" in flags else 0
    if ones:
        constants.update({name: 1 for name in _MAY_BE_ONE if name in kernel.arg_names})
    aligned = [n for n in kernel.arg_names if (n.isupper() or n in _STRIDES) and n not in constants]
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(kernel, _signature(kernel, dtype, constants), constexprs=constants, attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages}
    )
    seconds = time.perf_counter() - start
    usage = _resource_usage(compiled.asm["cubin"])
    return {
        "seconds": seconds,
        "shared": compiled.metadata.shared,
        "wgmma": "warp_group_dot" in compiled.asm["ttgir"],
        **usage,
    }


def _resource_usage(cubin: bytes) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run(
            [tool, "-res-usage", fh.name], capture_output=True, text=True, check=True
        ).stdout
    found = dict(re.findall(r"(REG|STACK):(\d+)", text))
    return {"registers": int(found.get("REG", -1)), "stack": int(found.get("STACK", -1))}


def main(args: argparse.Namespace) -> int:
    """The ``compile-check`` command; 1 when some candidate failed to compile."""
    failures = 0
    jobs: list[tuple[str, Any, str, int, tuple[int, int, int, int], bool, tuple[str, ...], int]] = []
    for name, kernel in KERNELS.items():
        for tier, tiles in _CANDIDATES[name].items():
            jobs += [(name, kernel, "bf16", tier, tile, False, (), 1) for tile in tiles]
            # grouped-query attention: four query heads per K/V head
            jobs.append((name, kernel, "bf16", tier, tiles[0], False, (), 4))
        for tier, tiles in _FLOAT32.items():
            jobs += [(name, kernel, "fp32", tier, tile, False, (), 1) for tile in tiles]
        jobs.append((name, kernel, "bf16", 64, _CANDIDATES[name][64][0], True, (), 1))
        for tier in (64, 128):  # tensor descriptors: 16-bit inputs, head sizes up to 128
            jobs += [
                (name, kernel, "bf16", tier, tile, False, ("USE_TMA",), 1) for tile in _CANDIDATES[name][tier]
            ]
            if name == "dkdv":
                jobs += [
                    (name, kernel, "bf16", tier, tile, False, ("DQ_BULK",), 1)
                    for tile in _CANDIDATES[name][tier]
                ]
                jobs.append((name, kernel, "bf16", tier, _CANDIDATES[name][tier][0], False, ("DQ_BULK",), 4))
    print(
        "| kernel | flags | group | dtype | d | BLOCK_M x BLOCK_N, warps, stages | args = 1 | regs | stack "
        "| shared | wgmma | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, kernel, dtype, head_dim, tile, ones, flags, group in jobs:
        label = "+".join(flags) or "-"
        try:
            r = compile_one(kernel, dtype, head_dim, tile, args.arch, ones, flags, group)
        except Exception as exc:  # report every candidate, failing ones included
            failures += 1
            print(
                f"| {name} | {label} | {group} | {dtype} | {head_dim} | {tile} | {ones} | FAILED: {type(exc).__name__}: {str(exc)[:200]} |"
            )
            continue
        print(
            f"| {name} | {label} | {group} | {dtype} | {head_dim} | {tile[0]}x{tile[1]}, {tile[2]}, {tile[3]} | {ones} | "
            f"{r['registers']} | {r['stack']} | {r['shared']} | {r['wgmma']} | {r['seconds']:.1f} |"
        )
    return 1 if failures else 0
