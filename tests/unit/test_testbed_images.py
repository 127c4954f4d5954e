"""The test bed reads what an image is made of from its Dockerfile, never from a second list."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmmr1_testbed import images
from lmmr1_testbed.layout import REPO_ROOT

DOCKERFILE = """
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE} AS build
USER 0
RUN python -m venv /opt/venv
COPY requirements/trainer-cpu.txt ./requirements/
RUN pip install --no-deps \\
      --requirement requirements/trainer-cpu.txt

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \\
    HOME=/home/lmmr1 PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /home/lmmr1
"""


def test_an_images_user_workdir_env_and_lock_come_from_its_final_stage(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(DOCKERFILE)
    spec = images.parse_dockerfile("example:1", "Dockerfile", tmp_path)
    assert (spec.uid, spec.gid, spec.workdir, spec.home) == (
        1000,
        1000,
        "/home/lmmr1",
        "/home/lmmr1",
    )
    assert spec.lock == "requirements/trainer-cpu.txt" and spec.name == "trainer-cpu"
    assert spec.venv_path == "/opt/venv"
    assert spec.env["PATH"] == f"/opt/venv/bin:{images.BASE_PATH}"
    assert spec.env["PYTHONUNBUFFERED"] == "1"


def test_a_non_numeric_user_is_refused_with_the_line(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(DOCKERFILE.replace("USER 1000:1000", "USER lmmr1"))
    with pytest.raises(images.ImageError, match="USER must be numeric"):
        images.parse_dockerfile("example:1", "Dockerfile", tmp_path)


def test_a_dockerfile_without_a_lock_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM python:3.11\nRUN pip install torch\nUSER 1\n")
    with pytest.raises(images.ImageError, match="installs no requirements"):
        images.parse_dockerfile("example:1", "Dockerfile", tmp_path)


@pytest.mark.parametrize("reference", sorted(images.IMAGES))
def test_every_runnable_image_is_non_root_in_a_venv_with_its_own_lock(reference: str) -> None:
    spec = images.parse_dockerfile(reference, images.IMAGES[reference])
    assert spec.uid != 0 and spec.venv_path == "/opt/venv"
    assert (REPO_ROOT / spec.lock).is_file()
    assert spec.env["PATH"].startswith("/opt/venv/bin:")


def test_the_cuda_image_is_not_runnable_here() -> None:
    assert "ghcr.io/lmmr1/lmmr1-trainer:0.1.0" not in images.IMAGES
    assert images.TRAINER_CPU_IMAGE in images.IMAGES and images.OPERATOR_IMAGE in images.IMAGES


def test_the_images_accounts_are_its_base_and_useradd_users_only(tmp_path: Path) -> None:
    dockerfile = DOCKERFILE + "RUN useradd --uid 1000 --user-group --home-dir /home/lmmr1 lmmr1\n"
    (tmp_path / "Dockerfile").write_text(dockerfile)
    spec = images.parse_dockerfile("example:1", "Dockerfile", tmp_path)
    assert spec.users == [("lmmr1", 1000, 1000, "/home/lmmr1")]
    passwd, group = images.account_files(spec)
    assert "lmmr1:x:1000:1000::/home/lmmr1:/bin/sh" in passwd.splitlines()
    assert "lmmr1:x:1000:" in group.splitlines()
    # The operator image's 65532 has no name, as in python:3.11-slim.
    operator = images.parse_dockerfile(images.OPERATOR_IMAGE, images.IMAGES[images.OPERATOR_IMAGE])
    assert operator.uid == 65532 and ":65532:" not in images.account_files(operator)[0]


def test_the_cpu_image_prebuilds_deepspeeds_cpu_collective_op() -> None:
    """Built as the Dockerfile builds it, so trainer pods never JIT-compile at start-up."""
    spec = images.parse_dockerfile(
        images.TRAINER_CPU_IMAGE, images.IMAGES[images.TRAINER_CPU_IMAGE]
    )
    assert spec.build_env["DS_BUILD_SHM_COMM"] == "1" and spec.build_env["DS_ACCELERATOR"] == "cpu"
