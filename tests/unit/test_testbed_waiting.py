"""`wait_for`: a probe's failed assertion fails the test at once; anything else it raises
means "not yet" and is shown if the wait times out. A failed kubectl/helm command run through
the test bed's `Cli` is such a "not yet" (`CommandFailed`, not an AssertionError)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from lmmr1_testbed.layout import TestBedState, cache_dir
from lmmr1_testbed.pytest_plugin import Cli, CommandFailed
from lmmr1_testbed.waiting import wait_for


def test_an_assertion_inside_the_probe_fails_at_once_with_its_own_message() -> None:
    calls = []

    def probe() -> bool:
        calls.append(1)
        assert len(calls) > 5, "the run failed while we waited"
        return True

    started = time.monotonic()
    with pytest.raises(AssertionError, match="the run failed while we waited"):
        wait_for("never", probe, timeout=3, interval=0.01)
    assert time.monotonic() - started < 2 and len(calls) == 1


def test_other_errors_mean_not_yet_and_are_shown_on_timeout() -> None:
    answers: list[Exception | str | None] = [ConnectionError("refused"), None, "", "ready"]
    results = iter(answers)

    def probe() -> str | None:
        value = next(results)
        if isinstance(value, Exception):
            raise value
        return value

    assert wait_for("ready", probe, timeout=5, interval=0.01) == "ready"

    def refused() -> None:
        raise ConnectionError("connection refused")

    with pytest.raises(AssertionError, match=r"(?s)timed out after 0s waiting for x.*refused"):
        wait_for("x", refused, timeout=0.05, interval=0.01)


# -- the test bed's `Cli` inside a probe: a failed command is "not yet", not the test failing --

# A stand-in kubectl, run through the real `Cli` as a real subprocess: `get pod x` fails as
# kubectl does before the pod exists (exit 1, NotFound on stderr) for its first $FAILURES
# calls, then prints the pod.
FAKE_KUBECTL = """#!/bin/sh
calls=$(($(cat "$0.calls" 2>/dev/null || echo 0) + 1))
echo "$calls" > "$0.calls"
if [ "$calls" -le "$FAILURES" ]; then
  echo 'Error from server (NotFound): pods "x" not found' >&2
  exit 1
fi
echo '{"status": {"phase": "Failed"}}'
"""


def bed_state(bin_dir: Path, kubeconfig: Path) -> TestBedState:
    return TestBedState(
        run_dir=str(bin_dir),
        bin_dir=str(bin_dir),
        apiserver_url="https://127.0.0.1:1",
        kubeconfig=str(kubeconfig),
        s3_endpoint="http://127.0.0.1:1",
        s3_access_key="k",
        s3_secret_key="s",
    )


def fake_kubectl(tmp_path: Path, failures: int) -> tuple[Cli, Path]:
    script = tmp_path / "kubectl"
    script.write_text(FAKE_KUBECTL)
    script.chmod(0o755)
    cli = Cli(bed_state(tmp_path, tmp_path / "kubeconfig"), "kubectl", "ns")
    return cli, tmp_path / "kubectl.calls"


def pod_phase(cli: Cli, failures: int) -> str:
    out = cli("get", "pod", "x", "-o", "json", env={"FAILURES": str(failures)}).stdout
    return str(json.loads(out)["status"]["phase"])


def test_a_failing_kubectl_inside_the_probe_is_retried_until_it_succeeds(
    tmp_path: Path,
) -> None:
    cli, calls = fake_kubectl(tmp_path, failures=3)

    assert wait_for("pod x", lambda: pod_phase(cli, 3), timeout=30, interval=0.01) == "Failed"
    assert calls.read_text().strip() == "4"  # three NotFound, then the pod


def test_a_failing_assert_after_the_retried_kubectl_fails_at_once_with_its_message(
    tmp_path: Path,
) -> None:
    cli, calls = fake_kubectl(tmp_path, failures=2)

    def running() -> bool:
        phase = pod_phase(cli, 2)
        assert phase != "Failed", f"pod x is {phase}: it will never run"
        return phase == "Running"

    started = time.monotonic()
    with pytest.raises(AssertionError, match="pod x is Failed: it will never run") as failed:
        wait_for("pod x Running", running, timeout=30, interval=0.01)
    assert "timed out" not in str(failed.value)
    assert time.monotonic() - started < 15 and calls.read_text().strip() == "3"


def test_a_command_that_keeps_failing_times_out_showing_the_command_and_its_stderr(
    tmp_path: Path,
) -> None:
    cli, _ = fake_kubectl(tmp_path, failures=10**6)

    with pytest.raises(CommandFailed) as failed:
        pod_phase(cli, 10**6)
    assert not isinstance(failed.value, AssertionError)
    assert failed.value.returncode == 1 and "NotFound" in failed.value.stderr
    assert failed.value.argv[1:] == ["--namespace", "ns", "get", "pod", "x", "-o", "json"]
    with pytest.raises(AssertionError, match=r"(?s)timed out after 0s waiting for pod x.*NotFound"):
        wait_for("pod x", lambda: pod_phase(cli, 10**6), timeout=0.3, interval=0.01)


def real_kubectl() -> str | None:
    built = sorted(cache_dir().glob("testbed/*/bin/kubectl"))
    return str(built[-1]) if built else shutil.which("kubectl")


@pytest.mark.skipif(real_kubectl() is None, reason="no kubectl (make testbed builds one)")
def test_the_real_kubectl_against_no_server_raises_command_failed_which_is_retried(
    tmp_path: Path,
) -> None:
    """kubectl itself, pointed at a port nobody listens on (no cluster needed)."""
    kubectl = real_kubectl()
    assert kubectl is not None
    (tmp_path / "kubectl").symlink_to(kubectl)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    cli = Cli(bed_state(tmp_path, kubeconfig), "kubectl", "ns")
    attempts = []

    def probe() -> str:
        attempts.append(1)
        return cli("get", "pod", "x", "--request-timeout=5s", timeout=30).stdout

    with pytest.raises(AssertionError, match=r"(?s)timed out.*CommandFailed.*refused") as failed:
        wait_for("pod x", probe, timeout=1, interval=0.05)
    assert "exited 1" in str(failed.value)
    assert len(attempts) >= 2  # retried, not failed at the first refusal
