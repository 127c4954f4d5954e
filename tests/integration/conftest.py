"""Integration fixtures: the project's manifests installed once on the session's test bed, and
what the trainer's tests share (a warm tiny model, a verifier, S3 credentials)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.trainer_harness import build_tiny_model

from lmmr1_testbed.layout import REPO_ROOT, TestBedState
from lmmr1_testbed.pytest_plugin import Cli
from lmmr1_testbed.waiting import wait_for
from lmmr1_trainer.localrun import Service, start_verifier

MANIFESTS = REPO_ROOT / "manifests"


@pytest.fixture(scope="session")
def installed_manifests(testbed: TestBedState) -> Path:
    """`kubectl apply -f manifests/` as a user would, then wait for the CRDs."""
    kubectl = Cli(testbed, "kubectl")
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(MANIFESTS))
    for name in ("lmmr1runs.lmmr1.io",):
        wait_for(
            f"CRD {name} established",
            lambda name=name: (
                "True"
                in kubectl(
                    "get",
                    "crd",
                    name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                ).stdout
            ),
            state=testbed,
        )
    return MANIFESTS


# -- the trainer's tests: one warm model, a verifier, S3 credentials in the environment --


@pytest.fixture(scope="session")
def warm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2.5-VL after 100 SFT steps: it writes a well-formed answer about a third
    of the time on text and image prompts, so rewards vary and the format can be learned."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vl-warm"), warm_start_steps=100)


@pytest.fixture(scope="session")
def answering_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2.5-VL after 300 SFT steps: well-formed answers about 90% of the time,
    and the right count for an image now and then (measured 0.19 of samples), so a stage
    can earn accuracy, not only format."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vl-answering"), warm_start_steps=300)


@pytest.fixture(scope="module")
def verifier() -> Iterator[Service]:
    # The tiny warm-started models answer bare numbers (`<answer>7</answer>`), which only the
    # `lenient` profile reads; the default `lmm-r1` (the reference) would give them no accuracy.
    service = start_verifier(profile="lenient")
    yield service
    service.stop()


@pytest.fixture
def s3_env(testbed: TestBedState, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The test bed's S3 endpoint and keys, in this process's environment and returned."""
    env = testbed.s3_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env
