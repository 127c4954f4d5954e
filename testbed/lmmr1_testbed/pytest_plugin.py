"""pytest fixtures over the test bed.

The test bed starts once per session (or is reused when `make cluster-up` already started
it, in which case it is left running), each test gets its own namespace and S3 bucket.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from lmmr1_testbed import bed
from lmmr1_testbed.layout import PrerequisiteMissing, TestBedState


@pytest.fixture(scope="session")
def testbed() -> Iterator[TestBedState]:
    running = bed.status()
    if running is not None:
        # A kept test bed runs this checkout's code, as a rebuilt image would.
        bed.up()
        yield running
        return
    try:
        state = bed.up()
    except (PrerequisiteMissing, RuntimeError) as err:
        pytest.fail(f"the test bed did not start: {err}", pytrace=False)
    try:
        yield state
    finally:
        if not os.environ.get("LMMR1_KEEP_TESTBED"):
            bed.down()


POD_SECURITY_LABEL = "pod-security.kubernetes.io/enforce"


class CommandFailed(RuntimeError):
    """A test bed command (kubectl, helm) exited non-zero.

    Not an AssertionError: inside a `wait_for` probe a failed command is a normal "not yet"
    (`kubectl get pod x` before x exists, the API server still starting) and is retried,
    while an AssertionError there is the test's own check failing and ends the wait at once.
    Outside a probe it fails the test like any other exception.
    """

    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"{' '.join(argv)} exited {returncode}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        )

    def __reduce__(self) -> tuple[type[CommandFailed], tuple[list[str], int, str, str]]:
        return (type(self), (self.argv, self.returncode, self.stdout, self.stderr))


@dataclass
class Cli:
    """A test bed command-line client (kubectl or helm) run as the admin unless told.

    A non-zero exit raises CommandFailed unless `check=False`.
    """

    state: TestBedState
    name: str
    namespace: str | None = None

    def __call__(
        self,
        *args: str,
        stdin: str | None = None,
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        argv = [self.state.binary(self.name), *args]
        if self.namespace and not any(
            a in ("-n", "--namespace", "-A") or a.startswith("--namespace=") for a in args
        ):
            argv[1:1] = ["--namespace", self.namespace]
        result = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **self.state.client_env(), **(env or {})},
            check=False,
        )
        if check and result.returncode != 0:
            raise CommandFailed(argv, result.returncode, result.stdout, result.stderr)
        return result


@pytest.fixture(scope="session")
def batch_controllers(testbed: TestBedState) -> TestBedState:
    """The test bed with Kueue and JobSet running (started once, on first use; their build,
    if not cached, waits here)."""
    from lmmr1_testbed import batch

    try:
        batch.ensure(testbed)
    except (PrerequisiteMissing, RuntimeError) as err:
        pytest.fail(f"Kueue and JobSet did not start: {err}", pytrace=False)
    return testbed


@pytest.fixture(scope="session")
def kube_client(testbed: TestBedState) -> Any:
    from kubernetes import config

    return config.new_client_from_config(config_file=testbed.kubeconfig)  # type: ignore[no-untyped-call]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pod_security(level): the Pod Security level the test's namespace enforces "
        "(default: restricted, as on a shared cluster)",
    )


@pytest.fixture
def namespace(testbed: TestBedState, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace whose Pod Security admission enforces `restricted` unless the test
    is marked `@pytest.mark.pod_security("privileged")` (tests of root-only behaviour)."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{secrets.token_hex(3)}"
    marker = request.node.get_closest_marker("pod_security")
    level = marker.args[0] if marker else "restricted"
    kubectl = Cli(testbed, "kubectl")
    kubectl("create", "namespace", name)
    kubectl("label", "namespace", name, f"{POD_SECURITY_LABEL}={level}")
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def kubectl(testbed: TestBedState, namespace: str) -> Cli:
    return Cli(testbed, "kubectl", namespace)


@pytest.fixture
def helm(testbed: TestBedState, namespace: str) -> Cli:
    return Cli(testbed, "helm", namespace)


@pytest.fixture(scope="session")
def s3_client(testbed: TestBedState) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=testbed.s3_endpoint,
        aws_access_key_id=testbed.s3_access_key,
        aws_secret_access_key=testbed.s3_secret_key,
        region_name=testbed.s3_region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )


@pytest.fixture
def s3_bucket(s3_client: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{secrets.token_hex(3)}"
    s3_client.create_bucket(Bucket=name)
    yield name
    paginator = s3_client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=name):
        for obj in page.get("Contents", []):
            s3_client.delete_object(Bucket=name, Key=obj["Key"])
    s3_client.delete_bucket(Bucket=name)


WaitFor = Callable[..., Any]


@pytest.fixture
def wait(testbed: TestBedState, namespace: str) -> WaitFor:
    """`wait("what", probe, timeout=…)` with this test's namespace in the diagnostics."""
    from lmmr1_testbed.waiting import wait_for

    def _wait(what: str, probe: Callable[[], Any], timeout: float = 60.0) -> Any:
        return wait_for(what, probe, timeout=timeout, state=testbed, namespace=namespace)

    return _wait
