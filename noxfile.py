"""Sessions mirror the install sets: core alone, core + one package, everything.

Every session installs torch through uv, whose cache is shared by all sessions on a machine, so
torch is downloaded once per machine rather than once per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = False

ROOT = Path(__file__).parent
PYTHON = os.environ.get("DILATED_ATTN_PYTHON", "3.11")
CORE = "packages/core"
PURE = {"ring": "packages/ring", "sparse": "packages/sparse", "bench": "packages/bench"}
POOL = "packages/pool-rs"
TEST_DEPS = ["pytest>=8", "hypothesis>=6.100"]


def _existing(paths: list[str]) -> list[str]:
    return [p for p in paths if (ROOT / p / "pyproject.toml").exists()]


def _install_pool(session: nox.Session) -> None:
    """Build the Rust pool's abi3 wheel with maturin and install it."""
    if not (ROOT / POOL / "pyproject.toml").exists():
        return
    session.install("maturin>=1.9.4,<2")
    wheels = Path(session.create_tmp()) / "wheels"
    session.run("maturin", "build", "--release", "-m", f"{POOL}/Cargo.toml", "-o", str(wheels), "--quiet")
    session.install("--no-deps", *sorted(str(w) for w in wheels.glob("*.whl")))


def _pytest(session: nox.Session, *paths: str) -> None:
    session.run("python", "-m", "pytest", *paths, *session.posargs, env={"DILATED_ATTN_LOAD_PLUGINS": None})


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Every package installed together; the whole test suite."""
    session.install(*TEST_DEPS, CORE, *_existing(list(PURE.values())))
    _install_pool(session)
    _pytest(session, "tests")


@nox.session(python=PYTHON)
def tests_core(session: nox.Session) -> None:
    """Core alone in its own environment: no other package may be needed by it."""
    session.install(*TEST_DEPS, CORE)
    _pytest(session, "tests/core", "tests/kernels")


@nox.session(python=PYTHON)
@nox.parametrize("package", list(PURE))
def tests_package(session: nox.Session, package: str) -> None:
    """Core plus one package: an undeclared import of a sibling package fails here."""
    if not _existing([PURE[package]]):
        session.skip(f"{PURE[package]} does not exist")
    session.install(*TEST_DEPS, CORE, PURE[package])
    _pytest(session, f"tests/{package}")


@nox.session(python=PYTHON)
def tests_pool(session: nox.Session) -> None:
    """Core plus the Rust pool wheel built by maturin."""
    session.install(*TEST_DEPS, CORE)
    _install_pool(session)
    _pytest(session, "tests/pool")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy over every package's sources."""
    session.install("mypy>=1.10", CORE, *_existing(list(PURE.values())))
    paths = [f"{p}/src" for p in [CORE, *_existing(list(PURE.values()))]]
    session.run("mypy", *paths, f"{POOL}/python")


@nox.session(python=False)
def rust(session: nox.Session) -> None:
    """cargo fmt --check, clippy with warnings as errors, and cargo test for the pool ledger."""
    manifest = f"{POOL}/Cargo.toml"
    session.run("cargo", "fmt", "--manifest-path", manifest, "--check", external=True)
    session.run(
        "cargo",
        "clippy",
        "--manifest-path",
        manifest,
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
        external=True,
    )
    session.run("cargo", "test", "--manifest-path", manifest, external=True)


@nox.session(python=PYTHON)
def stubtest(session: nox.Session) -> None:
    """mypy.stubtest: the hand-written .pyi of the compiled pool module matches the binary."""
    session.install("mypy>=1.10", CORE)
    _install_pool(session)
    # The wheel just built and installed is what is checked: a PYTHONPATH or MYPYPATH inherited from
    # the shell (e.g. one naming packages/pool-rs/python) would put the source tree's stub, and
    # whatever binary sits there, ahead of it.
    session.run(
        "python",
        "-m",
        "mypy.stubtest",
        "dilated_attn_pool._pool_rs",
        env={"PYTHONPATH": None, "MYPYPATH": None},
    )


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The benchmark on this machine: longnet presets on a GPU, the cpu-quick preset otherwise."""
    session.install(CORE, *_existing(list(PURE.values())))
    _install_pool(session)
    session.run("dilated-attn-bench", "run", *session.posargs)
