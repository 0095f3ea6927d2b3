"""``examples/train_longnet.py`` on gloo processes equals the same steps in one process.

The example trains a ``LongNetLM`` with the sequence split across the ``sp`` ranks (attention through
the ring) and FSDP2 over all ranks; here it runs a few steps at toy size (float64, and float32,
where FSDP2 would use a pre-multiplied sum that gloo lacks), and each step's loss and full parameter
gradients must match one process training on the whole sequences with the oracle as attention.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("dilated_attn_ring")

from dilated_attn.testing import TOLERANCES, relative_error  # noqa: E402

EXAMPLE = Path(__file__).parents[2] / "packages" / "ring" / "examples" / "train_longnet.py"
TIMEOUT_S = 300
# Segments of 8 cross the 12-token chunk edge and the 24-token one spans both sp ranks, so the ring
# exchanges pieces as well as running local segments.
TOY = [
    "--device", "cpu", "--seq-len", "24", "--vocab", "17", "--embed-dim", "16",
    "--layers", "2", "--heads", "2", "--segment-lengths", "4", "8", "24", "--dilation-rates", "1", "2", "3",
    "--steps", "3", "--lr", "0.01",
]  # fmt: skip


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_longnet", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, argv: list[str]) -> list[str]:
    env = dict(
        os.environ,
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        OMP_NUM_THREADS="1",
        DILATED_ATTN_LOAD_PLUGINS="ring",
    )
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    procs = [
        subprocess.Popen(
            [sys.executable, str(EXAMPLE), *argv],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    codes = [proc.returncode for proc in procs]
    if any(codes):
        pytest.fail(f"example ranks exited with {codes}:\n" + "\n".join(logs)[-6000:])
    return logs


def _one_process(example: ModuleType, argv: list[str]) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """The same steps with every replica's whole sequences in one process, oracle attention."""
    args = example.parse_args(argv)
    model = example.build_model(args, backend="reference")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses, grads = [], []
    for step in range(args.steps):
        loss = (
            sum(
                example.chunk_loss(model, example.batch_tokens(args, step, replica), 0, args.seq_len, "cpu")
                for replica in range(args.dp)
            )
            / args.dp
        )
        loss.backward()
        losses.append(loss.item())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad()
    return losses, grads


@pytest.mark.parametrize(
    ("world", "dp", "batch", "dtype"),
    [(2, 1, 2, "float64"), (4, 2, 1, "float64"), (4, 2, 1, "float32")],
    ids=["sp2", "dp2xsp2", "dp2xsp2-float32"],
)
def test_sequence_parallel_fsdp_training_equals_one_process(
    tmp_path: Path, world: int, dp: int, batch: int, dtype: str
) -> None:
    report = tmp_path / "report.pt"
    argv = [*TOY, "--dtype", dtype, "--dp", str(dp), "--batch", str(batch), "--report", str(report)]
    logs = _launch(world, argv)
    assert "step 2: loss" in logs[0]
    got = torch.load(report)
    losses, grads = _one_process(_example(), argv)
    fwd_tol, grad_tol = TOLERANCES[getattr(torch, dtype)]
    assert len(got["loss"]) == len(losses) == 3
    for step, (a, b) in enumerate(zip(got["loss"], losses)):
        assert abs(a - b) <= fwd_tol * abs(b), f"step {step}: loss {a!r} != {b!r}"
    # Later steps differ from the first (the optimizer moved), so a frozen model would fail.
    assert abs(losses[2] - losses[0]) > 1e-4
    for step, (mine, theirs) in enumerate(zip(got["grads"], grads)):
        assert mine.keys() == theirs.keys()
        total = torch.cat([t.flatten() for t in theirs.values()])
        assert relative_error(torch.cat([t.flatten() for t in mine.values()]), total) <= grad_tol
        # Per parameter against the whole gradient's norm: some are zero up to rounding (softmax
        # ignores the key bias), where a relative error would only compare rounding noise.
        for name in theirs:
            err = float((mine[name] - theirs[name]).norm() / total.norm())
            assert err <= grad_tol, f"step {step}: {name} gradient error {err:.3e} of the gradient's norm"


def test_example_refuses_a_dp_that_does_not_divide_the_world(tmp_path: Path) -> None:
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), *TOY, "--dtype", "float64", "--dp", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode != 0
    assert "error: --dp 2 must divide the world size 1" in proc.stderr
