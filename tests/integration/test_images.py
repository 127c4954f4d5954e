"""The images install what they claim: each Dockerfile's pip steps replayed in a fresh
virtualenv (no container engine here), and their references checked against the repo."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lmmr1_testbed.layout import REPO_ROOT

DOCKERFILES = [
    REPO_ROOT / "Dockerfile",
    REPO_ROOT / "trainer_image" / "Dockerfile",
    REPO_ROOT / "trainer_image" / "Dockerfile.cpu",
]


def run(*argv: str | Path, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, check=False, timeout=900
    )
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_dockerfile_references_exist(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    extras = set(
        tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
            "optional-dependencies"
        ]
    )
    for line in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for source in line.split():
            assert (REPO_ROOT / source).exists(), f"{dockerfile.name}: COPY {source} is missing"
    for group in re.findall(r"\[([a-z,]+)\]", text):
        assert set(group.split(",")) <= extras, f"{dockerfile.name}: unknown extra in [{group}]"
    assert re.search(r"^USER (?!root|0\b)", text, flags=re.M), "images must not run as root"
    assert re.search(r"^FROM \S+ AS ", text, flags=re.M), "multi-stage build expected"


def test_operator_image_install_imports_without_torch(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    pip = venv / "bin" / "pip"
    # The same two steps as the Dockerfile: pinned dependencies, then the package alone.
    run(pip, "install", "-q", "--requirement", REPO_ROOT / "requirements" / "operator.txt")
    run(pip, "install", "-q", "--no-deps", REPO_ROOT)
    python = venv / "bin" / "python"
    run(python, "-c", "import kopf, kubernetes, prometheus_client, lmmr1_operator.api.crd")
    run(venv / "bin" / "kopf", "--help")
    missing = subprocess.run([python, "-c", "import torch"], capture_output=True, check=False)
    assert missing.returncode != 0, "the operator image must not carry torch"


def test_verifier_extra_installs_and_starts(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "pip", "install", "-q", f"{REPO_ROOT}[verifier]")
    help_text = run(venv / "bin" / "python", "-m", "lmmr1_trainer.verifier", "--help").stdout
    assert "--prompt-template" in help_text
