"""The test bed's images: each image reference the process node can "pull" is an environment
built from that image's own Dockerfile and lock file, so pods run what the image would run.

What an image is made of comes from its Dockerfile's final stage, never from a second list:
- the lock file it installs (`--requirement requirements/<name>.txt`), installed with
  `--no-deps` into a relocatable virtualenv on Debian's Python 3.11 (the images' Python
  minor version; it lives outside /root, so a non-root container can execute it);
- the virtualenv's path in the image (`ENV VIRTUAL_ENV` or the first `PATH` entry);
- the default user (`USER uid:gid`), `WORKDIR` and every `ENV` (HOME, PATH, ...);
- the project itself, installed as a wheel with `--no-deps` on every `up`, like the image's
  last layer.

Environments are cached under `<cache>/images/<name>-<digest of the lock>`; an image with no
environment (the CUDA trainer image) cannot be pulled on the test bed, as on a cluster that
has no such image.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmmr1_testbed.layout import REPO_ROOT

# Image reference -> its Dockerfile (relative to the repository). The CUDA trainer image
# (`ghcr.io/lmmr1/lmmr1-trainer:0.1.0`) is deliberately absent: it cannot run here.
IMAGES: dict[str, str] = {
    "ghcr.io/lmmr1/lmmr1-operator:0.1.0": "Dockerfile",
    "ghcr.io/lmmr1/lmmr1-trainer:0.1.0-cpu": "trainer_image/Dockerfile.cpu",
}
OPERATOR_IMAGE = "ghcr.io/lmmr1/lmmr1-operator:0.1.0"
TRAINER_CPU_IMAGE = "ghcr.io/lmmr1/lmmr1-trainer:0.1.0-cpu"

# The python:3.11-slim base images' PATH, which the Dockerfiles extend with `$PATH`.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_PYTHON = Path("/usr/bin/python3.11")
# Packages whose build imports torch: installed after the rest, without build isolation.
BUILT_AGAINST_TORCH = {"deepspeed"}
# The project's packages, as its wheel (pyproject.toml) holds them.
PROJECT_PACKAGES = ("lmmr1_operator", "lmmr1_trainer")
BUILDER_VERSION = "3"  # bump to rebuild every cached environment (3: with bytecode)


class ImageError(RuntimeError):
    """A Dockerfile the test bed cannot turn into an environment."""


@dataclass(frozen=True)
class ImageSpec:
    """What the process node needs to run a container of one image."""

    reference: str
    dockerfile: str
    lock: str  # relative to the repository
    venv_path: str  # where the image has its virtualenv, e.g. /opt/venv
    uid: int
    gid: int
    workdir: str
    env: dict[str, str] = field(default_factory=dict)
    # Accounts the Dockerfile adds with `useradd`: (name, uid, gid, home).
    users: list[tuple[str, int, int, str]] = field(default_factory=list)
    # Variables set on the command that builds the torch-dependent packages (DS_BUILD_*).
    build_env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return Path(self.lock).stem

    @property
    def home(self) -> str:
        return self.env.get("HOME", "/")


def instructions(text: str) -> list[tuple[str, str]]:
    """A Dockerfile's (INSTRUCTION, argument) pairs: continuation lines joined, comments
    dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, argument = (pending + line).partition(" ")
        found.append((instruction.upper(), argument.strip()))
        pending = ""
    return found


def _final_stage(text: str) -> list[tuple[str, str]]:
    steps = instructions(text)
    starts = [i for i, (instruction, _) in enumerate(steps) if instruction == "FROM"]
    if not starts:
        raise ImageError("no FROM instruction")
    return steps[starts[-1] + 1 :]


def _env_pairs(argument: str) -> list[tuple[str, str]]:
    words = shlex.split(argument)
    if len(words) >= 2 and "=" not in words[0]:  # legacy `ENV KEY value with spaces`
        return [(words[0], " ".join(words[1:]))]
    return [tuple(word.split("=", 1)) for word in words]  # type: ignore[misc]


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), ""), value)


def parse_dockerfile(reference: str, dockerfile: str, root: Path = REPO_ROOT) -> ImageSpec:
    """Read an image's user, working directory, environment and lock file from its
    Dockerfile; anything the test bed cannot reproduce is an ImageError naming the line."""
    path = root / dockerfile
    text = path.read_text()
    env = {"PATH": BASE_PATH}
    uid = gid = 0
    workdir = "/"
    lock: str | None = None
    users: list[tuple[str, int, int, str]] = []
    for instruction, argument in _final_stage(text):
        line = f"{instruction} {argument}"
        if instruction == "RUN" and "useradd" in argument:
            users.append(_useradd(argument))
        if instruction == "ENV":
            for key, value in _env_pairs(argument):
                env[key] = _expand(value, env)
        elif instruction == "USER":
            match = re.fullmatch(r"(\d+)(?::(\d+))?", argument.strip())
            if not match:
                raise ImageError(f"{dockerfile}: USER must be numeric uid[:gid], got {line!r}")
            uid, gid = int(match.group(1)), int(match.group(2) or 0)
        elif instruction == "WORKDIR":
            workdir = os.path.normpath(os.path.join(workdir, _expand(argument.strip(), env)))
    # The lock may be installed in a build stage and copied over: look at the whole file.
    for match in re.finditer(r"(?:--requirement|-r)\s+(requirements/\S+\.txt)", text):
        lock = match.group(1)
    if lock is None:
        raise ImageError(f"{dockerfile}: installs no requirements/<name>.txt lock file")
    venv = env.get("VIRTUAL_ENV") or str(Path(env["PATH"].split(":")[0]).parent)
    build = re.search(r"((?:[A-Z_]+=\S+\s+)+)(?:\\\s*)?pip install[^&]*--no-build-isolation", text)
    build_env = dict(pair.split("=", 1) for pair in build.group(1).split()) if build else {}
    return ImageSpec(reference, dockerfile, lock, venv, uid, gid, workdir, env, users, build_env)


def _useradd(command: str) -> tuple[str, int, int, str]:
    words = shlex.split(command[command.index("useradd") :])
    options = dict(itertools.pairwise(words))  # each flag with the word after it
    uid = int(options.get("--uid", options.get("-u", "1000")))
    gid = int(options.get("--gid", options.get("-g", uid)))
    name = words[-1]
    home = options.get("--home-dir", options.get("-d", f"/home/{name}"))
    return name, uid, gid, home


# The Debian base images' own accounts, before a Dockerfile adds its users.
BASE_PASSWD = [
    "root:x:0:0:root:/root:/bin/bash",
    "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin",
    "bin:x:2:2:bin:/bin:/usr/sbin/nologin",
    "sys:x:3:3:sys:/dev:/usr/sbin/nologin",
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin",
]
BASE_GROUP = ["root:x:0:", "daemon:x:1:", "bin:x:2:", "sys:x:3:", "nogroup:x:65534:"]


def account_files(spec: ImageSpec) -> tuple[str, str]:
    """The image's /etc/passwd and /etc/group: a uid the image never created has no name
    there (as 65532 in a slim image), which code asking for its user's name must survive."""
    passwd = [*BASE_PASSWD]
    group = [*BASE_GROUP]
    for name, uid, gid, home in spec.users:
        passwd.append(f"{name}:x:{uid}:{gid}::{home}:/bin/sh")
        group.append(f"{name}:x:{gid}:")
    return "\n".join(passwd) + "\n", "\n".join(group) + "\n"


def known_images(root: Path = REPO_ROOT) -> list[ImageSpec]:
    return [parse_dockerfile(ref, dockerfile, root) for ref, dockerfile in IMAGES.items()]


# ----- building the environments ------------------------------------------------------------


def _uv(*args: str, env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "uv", *args]
    environ = {**os.environ, **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=environ)
    if result.returncode != 0:
        raise ImageError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")


def _base_python() -> Path:
    if not BASE_PYTHON.exists():
        raise ImageError(
            f"{BASE_PYTHON} not found: the image environments need Debian's Python 3.11 "
            "(apt-get install python3.11), a Python outside /root that non-root pods can run"
        )
    return BASE_PYTHON


def environment_key(spec: ImageSpec, root: Path = REPO_ROOT) -> str:
    digest = hashlib.sha256()
    digest.update((root / spec.lock).read_bytes())
    digest.update(f"{_base_python().resolve()}|{BUILDER_VERSION}|{spec.build_env}".encode())
    return digest.hexdigest()[:12]


def _requirements(lock: Path) -> list[str]:
    out = []
    for raw in lock.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(line)
    return out


def _package(requirement: str) -> str:
    return re.split(r"[=<>!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def ensure_environment(spec: ImageSpec, cache: Path, root: Path = REPO_ROOT) -> Path:
    """The image's cached virtualenv, built from its lock file when missing."""
    venv = cache / "images" / f"{spec.name}-{environment_key(spec, root)}"
    if (venv / ".complete").exists():
        return venv
    partial = venv.with_name(f"{venv.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"testbed: building the environment of {spec.reference} from {spec.lock}", flush=True)
    _uv("venv", "--quiet", "--relocatable", "--python", str(_base_python()), str(partial))
    python = str(partial / "bin" / "python")
    requirements = _requirements(root / spec.lock)
    first = [r for r in requirements if _package(r) not in BUILT_AGAINST_TORCH]
    later = [r for r in requirements if _package(r) in BUILT_AGAINST_TORCH]
    _uv("pip", "install", "--quiet", "--python", python, "--no-deps", *first)
    if later:
        # Built as the Dockerfile builds it (e.g. DeepSpeed's prebuilt CPU ops); --no-cache,
        # so neither a wheel built with other flags nor this one is shared through uv's cache.
        no_cache = ["--no-cache"] if spec.build_env else []
        _uv("pip", "install", "--quiet", "--python", python, "--no-deps", *no_cache,
            "--no-build-isolation", *later, env=spec.build_env)  # fmt: skip
    # Bytecode too, as the Dockerfiles' `pip install` leaves it: a pod never writes any (the
    # images set PYTHONDONTWRITEBYTECODE and run as a user who cannot), so without it every
    # trainer pod would compile torch, DeepSpeed and vLLM from source at start-up (measured:
    # 75 s against 48 s for a 4-step tiny stage). uv's --compile-bytecode compiles only what
    # that one call installed.
    _compile(python, [], strict=False)
    (partial / ".complete").write_text(spec.lock + "\n")
    shutil.rmtree(venv, ignore_errors=True)
    partial.rename(venv)
    for stale in venv.parent.glob(f"{spec.name}-*"):
        if stale != venv and ".partial-" not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
    return venv


def install_project(venvs: list[Path], wheel_dir: Path, root: Path = REPO_ROOT) -> None:
    """The image's last layer: this checkout as a wheel, `--no-deps`, into each env."""
    shutil.rmtree(wheel_dir, ignore_errors=True)
    _uv("build", "--quiet", "--wheel", "--out-dir", str(wheel_dir), str(root))
    (wheel,) = wheel_dir.glob("lmmr1-*.whl")
    for venv in venvs:
        python = str(venv / "bin" / "python")
        _uv("pip", "install", "--quiet", "--python", python, "--no-deps", "--reinstall",
            str(wheel))  # fmt: skip
        # Only the project's own modules: the rest were compiled when the environment was built.
        _compile(python, PROJECT_PACKAGES, strict=True)


def _compile(python: str, packages: Sequence[str], *, strict: bool) -> None:
    """Bytecode for `packages` in the environment of `python`, or for its whole site-packages.
    Not `strict`: some packages ship files that are not Python 3 (templates, test data), which
    are never imported and never compile."""
    script = (
        "import compileall, importlib.util, sys, sysconfig\n"
        "names = sys.argv[1:]\n"
        "folders = [importlib.util.find_spec(n).submodule_search_locations[0] for n in names]\n"
        "folders = folders or [sysconfig.get_paths()['purelib']]\n"
        "ok = all([compileall.compile_dir(f, quiet=1, workers=0) for f in folders])\n"
        "sys.exit(0 if ok else 1)\n"
    )
    result = subprocess.run(  # -I: the environment's own packages, whatever PYTHONPATH says
        [python, "-I", "-c", script, *packages], capture_output=True, text=True, check=False
    )
    if strict and result.returncode != 0:
        raise ImageError(f"compiling {packages} with {python} failed:\n{result.stdout[-4000:]}")


@dataclass(frozen=True)
class Runtime:
    """One pullable image as the process node sees it: the spec and where its env is."""

    spec: ImageSpec
    environment: str  # host path of the built virtualenv
    etc: str  # host directory holding the image's passwd and group files

    def to_json(self) -> dict[str, object]:
        return {"spec": asdict(self.spec), "environment": self.environment, "etc": self.etc}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Runtime:
        spec = dict(data["spec"])
        spec["users"] = [tuple(user) for user in spec.get("users", [])]
        return Runtime(ImageSpec(**spec), str(data["environment"]), str(data["etc"]))


def prepare(cache: Path, run_dir: Path, root: Path = REPO_ROOT) -> Path:
    """Build (or reuse) every image's environment, install this checkout into each, and
    write the process node's image table; returns the table's path."""
    runtimes = []
    for spec in known_images(root):
        etc = run_dir / "images" / spec.name / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        passwd, group = account_files(spec)
        (etc / "passwd").write_text(passwd)
        (etc / "group").write_text(group)
        environment = ensure_environment(spec, cache, root)
        runtimes.append(Runtime(spec, str(environment), str(etc)))
    install_project([Path(r.environment) for r in runtimes], run_dir / "images" / "wheel", root)
    table = run_dir / "images" / "images.json"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(json.dumps({r.spec.reference: r.to_json() for r in runtimes}, indent=1))
    return table


def load_table(path: Path) -> dict[str, Runtime]:
    data = json.loads(path.read_text())
    return {ref: Runtime.from_json(entry) for ref, entry in data.items()}
