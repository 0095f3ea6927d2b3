"""Sessions mirror the install sets: core alone, core + one package, everything.

Every session installs torch through uv, whose cache is shared by all sessions on a machine, so
torch is downloaded once per machine rather than once per session.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tarfile
import time
import zipfile
from pathlib import Path

import nox
import tomllib
from nox.virtualenv import find_uv
from packaging.requirements import Requirement

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = False

ROOT = Path(__file__).parent
PYTHON = os.environ.get("DILATED_ATTN_PYTHON", "3.11")
CORE = "packages/core"
PURE = {
    "ring": "packages/ring",
    "sparse": "packages/sparse",
    "bench": "packages/bench",
    "transformers": "packages/transformers",
}
POOL = "packages/pool-rs"
# numpy: tests convert tensors with .numpy(); no package imports it.
# pytest-xdist: the suite runs on every core (``-n auto``; ``DILATED_ATTN_TEST_WORKERS`` overrides).
TEST_DEPS = ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "numpy>=1.24"]


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
    workers = os.environ.get("DILATED_ATTN_TEST_WORKERS", "auto")
    session.run(
        "python",
        "-m",
        "pytest",
        "-n",
        workers,
        *paths,
        *session.posargs,
        env={"DILATED_ATTN_LOAD_PLUGINS": None},
    )


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


def _toml(path: Path) -> dict:
    with path.open("rb") as f:
        return tomllib.load(f)


def _check_release_metadata(session: nox.Session) -> None:
    """One version, pins that admit it, one license text: the rules the root pyproject.toml states."""
    version = (ROOT / "VERSION").read_text().strip()
    problems = []
    cargo = _toml(ROOT / POOL / "Cargo.toml")["package"]["version"]
    if cargo != version:
        problems.append(f"{POOL}/Cargo.toml has version {cargo!r}, VERSION has {version!r}")
    license_text = (ROOT / "LICENSE").read_bytes()
    for pyproject in [ROOT / "pyproject.toml", *sorted(ROOT.glob("packages/*/pyproject.toml"))]:
        where = pyproject.relative_to(ROOT)
        project = _toml(pyproject)["project"]
        if "version" in project:
            problems.append(f"{where} types its version; it must be dynamic (read from VERSION)")
        requirements = list(project.get("dependencies", []))
        for extra in project.get("optional-dependencies", {}).values():
            requirements.extend(extra)
        for requirement in map(Requirement, requirements):
            if not requirement.name.startswith("dilated-attn-"):
                continue
            if not requirement.specifier or not requirement.specifier.contains(version):
                problems.append(f"{where}: {requirement} must pin a range that contains {version}")
        license_copy = pyproject.parent / "LICENSE"
        if not license_copy.is_file() or license_copy.read_bytes() != license_text:
            problems.append(f"{license_copy.relative_to(ROOT)} must be a copy of the root LICENSE")
    if problems:
        session.error("release metadata: " + "; ".join(problems))
    session.log(f"release metadata: every package at {version}, pins admit it, LICENSE identical")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree, and the release metadata rules."""
    _check_release_metadata(session)
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


# Run in each environment the install session makes: the distributions it must hold (each at VERSION,
# each package importable), the repository's other packages absent, and one call of the function.
_SMOKE = """
import importlib, importlib.metadata, importlib.util, sys
version, wanted, members = sys.argv[1], set(sys.argv[2].split(",")), sys.argv[3].split(",")
module = {d: "dilated_attn" if d == "dilated-attn-core" else d.replace("-", "_") for d in members}
for dist in sorted(wanted):
    found = importlib.metadata.version(dist)
    assert found == version, f"{dist} {found} is installed; VERSION says {version}"
    if dist in module:
        imported = importlib.import_module(module[dist])
        assert getattr(imported, "__version__", version) == version, (dist, imported.__version__)
for dist in set(members) - wanted:
    assert importlib.util.find_spec(module[dist]) is None, f"{dist} is installed but was not asked for"
import torch
from dilated_attn import available_backends, available_pools, dilated_attention
q = torch.randn(1, 9, 2, 4)
assert dilated_attention(q, q, q, [4], [1]).shape == q.shape
for dist, name in [("dilated-attn-ring", "ring"), ("dilated-attn-sparse", "block_sparse")]:
    assert (name in available_backends()) == (dist in wanted), (name, available_backends())
assert ("rust" in available_pools()) == ("dilated-attn-pool" in wanted), available_pools()
print("installed and imported:", ", ".join(sorted(wanted)))
"""

# Copying a checkout for `uv sync` leaves out what builds and runs leave behind.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".nox",
    ".venv",
    "target",
    "dist",
    "build",
    "__pycache__",
    "*.so",
    "uv.lock",
    "bench-results",
    ".*_cache",
    ".hypothesis",
)


def _readme_install_lines() -> tuple[list[str], list[str]]:
    """The README's install lines (its indented code in "## Install"): from a checkout, once published."""
    section = (ROOT / "README.md").read_text().split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    checkout, published = section.split("Once published", 1)

    def lines(block: str) -> list[str]:
        return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.startswith("    ")]

    return lines(checkout), lines(published)


def _distributions_of(line: str) -> set[str]:
    """The distributions an install line asks for, through the meta-package's extras where it names them."""
    root = _toml(ROOT / "pyproject.toml")["project"]
    extras = root["optional-dependencies"]

    def meta(names: list[str]) -> set[str]:
        found = {root["name"], *(Requirement(r).name for r in root["dependencies"])}
        while names:
            for requirement in map(Requirement, extras[names.pop()]):
                if requirement.name == root["name"]:
                    names.extend(requirement.extras)
                else:
                    found.add(requirement.name)
        return found

    words = shlex.split(line)
    if words[:2] == ["uv", "sync"]:
        if "--all-packages" in words:
            return meta(list(extras))
        return meta([words[i + 1] for i, word in enumerate(words) if word == "--extra"])
    found: set[str] = set()
    for word in words[words.index("install") + 1 :]:
        if word.startswith("./packages/"):
            found.add(_toml(ROOT / word / "pyproject.toml")["project"]["name"])
        else:
            requirement = Requirement(root["name"] + word[1:] if word.startswith(".") else word)
            if requirement.name == root["name"]:
                found |= meta(sorted(requirement.extras))
            else:
                found.add(requirement.name)
    return found


@nox.session(python=False)
def install(session: nox.Session) -> None:
    """Every install line of the README's install section, each in a fresh environment, then imports.

    The lines are read from README.md, so what it shows is what runs. torch is seeded from uv's cache
    into each fresh environment first (pip would download it for every one); everything else, the
    build backends included, is resolved by the line itself. The published lines run against a folder
    of the sdists and wheels built here (the pool's by `maturin build`), each checked for the license.
    """
    # nox's own lookup (the uv package's binary first, then PATH); its tuple grew a third item in 2025.
    has_uv, uv = find_uv()[:2]
    if not has_uv:
        session.error("the install session needs uv (python3 -m pip install uv)")
    version = (ROOT / "VERSION").read_text().strip()
    members = sorted(_toml(p)["project"]["name"] for p in ROOT.glob("packages/*/pyproject.toml"))
    tmp = Path(session.create_tmp()).resolve()
    smoke = tmp / "smoke.py"
    smoke.write_text(_SMOKE)
    checkout, dist = tmp / "checkout", tmp / "dist"
    for folder in (checkout, dist):
        shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(ROOT, checkout, ignore=_NOT_SOURCES)
    # One Cargo build folder for every build of the pool here (pip's, uv's, maturin's), so the crate
    # compiles once per profile instead of once per build tool.
    env = {"CARGO_TARGET_DIR": str(ROOT / POOL / "target"), "VIRTUAL_ENV": None, "PYTHONPATH": None}

    def run(*args: str | Path, cwd: Path = ROOT) -> None:
        with session.chdir(cwd):
            session.run(*map(str, args), external=True, env=env)

    def fresh() -> Path:
        venv = tmp / "venv"
        shutil.rmtree(venv, ignore_errors=True)
        run(uv, "venv", "--quiet", "--seed", "-p", PYTHON, venv)
        run(uv, "pip", "install", "--quiet", "-p", venv / "bin" / "python", "torch")
        return venv / "bin" / "python"

    def install_line(line: str, find_links: Path | None = None) -> None:
        started = time.monotonic()
        words = shlex.split(line)
        links = ["--find-links", str(find_links)] if find_links else []
        if words[:2] == ["uv", "sync"]:
            python, cwd = checkout / ".venv" / "bin" / "python", checkout
            run(uv, "sync", "--quiet", "-p", PYTHON, *words[2:], cwd=cwd)
        elif words[:3] == ["uv", "pip", "install"]:
            python, cwd = fresh(), ROOT
            run(uv, "pip", "install", "--quiet", "-p", python, *links, *words[3:])
        elif words[:2] == ["pip", "install"]:
            python, cwd = fresh(), ROOT
            run(python, "-m", "pip", "install", "--quiet", *links, *words[2:])
        else:
            session.error(
                f"README install line {line!r}: the session runs pip install, uv pip install, uv sync"
            )
        # The published lines import from outside the checkout, so nothing there is on sys.path.
        wanted = _distributions_of(line)
        run(python, smoke, version, ",".join(sorted(wanted)), ",".join(members), cwd=tmp if links else cwd)
        session.log(f"{line!r} installed {len(wanted)} distributions in {time.monotonic() - started:.0f} s")

    from_checkout, published = _readme_install_lines()
    for line in from_checkout:
        install_line(line)
    for folder in [
        ".",
        *sorted(str(p.parent.relative_to(ROOT)) for p in ROOT.glob("packages/*/pyproject.toml")),
    ]:
        if folder != POOL:
            run(uv, "build", "--quiet", "-o", dist, folder)
    maturin = [uv, "tool", "run", "maturin>=1.9.4,<2"]
    run(*maturin, "sdist", "-m", f"{POOL}/Cargo.toml", "-o", dist)
    run(*maturin, "build", "--release", "--quiet", "-m", f"{POOL}/Cargo.toml", "-o", dist)
    _check_dists(session, dist, version, members)
    for line in published:
        install_line(line, find_links=dist)


def _check_dists(session: nox.Session, dist: Path, version: str, members: list[str]) -> None:
    """Each distribution at VERSION with the license inside; compiled wheels tagged for an index."""
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    names = {name.replace("-", "_") for name in ["dilated-attn", *members]}
    for kind, found in [("wheel", wheels), ("sdist", sdists)]:
        stems = [f.name.removesuffix(".tar.gz").split("-") for f in found]
        if {s[0] for s in stems} != names or any(s[1] != version for s in stems):
            session.error(f"{kind}s built: {[f.name for f in found]}; expected {sorted(names)} at {version}")
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            if not any(n.endswith(".dist-info/licenses/LICENSE") for n in zf.namelist()):
                session.error(f"{wheel.name} carries no LICENSE")
        if "abi3" in wheel.name and "manylinux" not in wheel.name:
            session.error(f"{wheel.name} is not tagged manylinux; an index refuses it")
    for sdist in sdists:
        with tarfile.open(sdist) as tf:
            if f"{sdist.name.removesuffix('.tar.gz')}/LICENSE" not in tf.getnames():
                session.error(f"{sdist.name} carries no LICENSE")
