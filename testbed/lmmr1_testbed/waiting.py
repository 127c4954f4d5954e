"""Waiting for cluster state in tests, with failure messages that show what went wrong."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

from lmmr1_testbed.layout import TestBedState

T = TypeVar("T")

# Exceptions from a probe that end a wait at once; every other Exception means "not yet".
FAILS_AT_ONCE: tuple[type[BaseException], ...] = (AssertionError,)


def diagnostics(state: TestBedState, namespace: str | None) -> str:
    """The namespace's last events and every pod's phase and container states."""
    scope = ["-n", namespace] if namespace else ["-A"]
    kubectl = [state.binary("kubectl"), f"--kubeconfig={state.kubeconfig}"]
    events = subprocess.run(
        [*kubectl, "get", "events", *scope, "--sort-by=.lastTimestamp"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()[-15:]
    pods = subprocess.run(
        [*kubectl, "get", "pods", *scope, "-o", "json"], capture_output=True, text=True, check=False
    ).stdout
    lines = ["last events:", *events, "pods:"]
    try:
        items = json.loads(pods)["items"]
    except (json.JSONDecodeError, KeyError):
        items = []
    for pod in items:
        status = pod.get("status", {})
        containers = [
            f"{c['name']}={next(iter(c.get('state', {'?': 0})))}"
            + (
                f"({c['state']['terminated']['exitCode']})"
                if "terminated" in c.get("state", {})
                else ""
            )
            for c in status.get("initContainerStatuses", []) + status.get("containerStatuses", [])
        ]
        lines.append(
            f"  {pod['metadata']['name']} on {pod['spec'].get('nodeName', '-')}: "
            f"{status.get('phase')} {' '.join(containers)}"
        )
    return "\n".join(lines)


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float = 60.0,
    interval: float = 0.25,
    state: TestBedState | None = None,
    namespace: str | None = None,
) -> T:
    """Poll `probe` until it returns something truthy; on timeout fail with diagnostics.

    What the probe raises decides:
    - AssertionError (FAILS_AT_ONCE) is the test's own check failing (say, the run already
      Failed while we wait for a step): raised at once, with its message, not after
      `timeout`. pytest.fail/skip are not Exceptions and also go through at once.
    - Any other Exception means "not yet": retried, and the last one is shown on timeout.
      That is `CommandFailed` from the test bed's `Cli` (kubectl/helm exited non-zero:
      `kubectl get pod x` before x exists), a refused or reset connection (OSError),
      subprocess.TimeoutExpired, and KeyError/IndexError/JSON errors on a half-filled
      object. A probe must not turn these into AssertionErrors.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except FAILS_AT_ONCE:
            raise
        except Exception as err:  # noted, shown on timeout
            last_error = err
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    message = f"timed out after {timeout:.0f}s waiting for {what}"
    if last_error is not None:
        message += f"\nlast error: {last_error!r}"
    if state is not None:
        message += "\n" + diagnostics(state, namespace)
    raise AssertionError(message)
