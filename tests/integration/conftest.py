"""Integration fixtures: the project's manifests installed once on the session's test bed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmmr1_testbed.layout import REPO_ROOT, TestBedState
from lmmr1_testbed.pytest_plugin import Cli
from lmmr1_testbed.waiting import wait_for

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
