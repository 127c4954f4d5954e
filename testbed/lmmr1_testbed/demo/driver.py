"""The pieces of the demo, shared with the end-to-end test: install the operator with the
project's chart, apply a run with kubectl, follow it until it ends."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmmr1_testbed.layout import REPO_ROOT, TestBedState

CHART = REPO_ROOT / "charts" / "lmmr1"
EXAMPLE = REPO_ROOT / "manifests" / "examples" / "run-tiny.yaml"
OPERATOR_NAMESPACE = "lmmr1-system"
# Shared clusters enforce Pod Security `restricted`; the demo's namespaces do too.
RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"


def cli(
    state: TestBedState, tool: str, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [state.binary(tool), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, **state.client_env()},
        check=False,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{result.stderr}")
    return result


def items(
    state: TestBedState, namespace: str, kind: str, selector: str = ""
) -> list[dict[str, Any]]:
    """The objects `kubectl get <kind> -o json` lists in `namespace`, by label `selector`
    when one is given."""
    args = ["get", kind, "-n", namespace, "-o", "json", *(["-l", selector] if selector else [])]
    return list(json.loads(cli(state, "kubectl", *args).stdout)["items"])


def report_progress(
    state: TestBedState, namespace: str, run: str, progress: dict[str, Any], as_pods: bool = True
) -> None:
    """Write a stage's progress as its trainer does (`progress.json` in `<run>-progress`),
    for benches and tests that play the trainer; `as_pods`: as the namespace's default
    service account, the pods' identity, so the run's Role is what allows it."""
    patch = {"data": {"progress.json": json.dumps(progress)}}
    identity = [f"--as=system:serviceaccount:{namespace}:default"] if as_pods else []
    cli(
        state,
        "kubectl",
        "patch",
        "configmap",
        f"{run}-progress",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps(patch),
        *identity,
    )


def install_operator(
    state: TestBedState,
    namespace: str = OPERATOR_NAMESPACE,
    release: str = "lmmr1",
    watch_namespaces: Sequence[str] = (),
    fast_clock: bool = True,
    operator_values: dict[str, Any] | None = None,
    replicas: int = 1,
    chart_values: dict[str, Any] | None = None,
) -> None:
    """`helm install` the chart; its pod runs on the process node as a local process. It
    serves runs in `watch_namespaces` (empty: its own namespace only, the chart's default).
    `fast_clock`: a 1 s resync and a 2 s first restart back-off (tests and the demo); the
    scale benchmark measures the chart's defaults. `replicas` > 1: leader election decides
    which one acts. `chart_values`: other top-level values (`kueue`, ...)."""
    cli(
        state,
        "kubectl",
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        str(REPO_ROOT / "manifests" / "10-crd-lmmr1runs.yaml"),
    )
    cli(state, "kubectl", "create", "namespace", namespace, check=False)
    cli(state, "kubectl", "label", "namespace", namespace, RESTRICTED, "--overwrite")
    values = {
        "crds": {"enabled": False},
        "replicaCount": replicas,
        "watchNamespaces": list(watch_namespaces),
        "nodeSelector": {"lmmr1.io/process-node": "true"},
        "tolerations": [{"key": "lmmr1.io/process-node", "operator": "Exists"}],
        # The process node gives pods loopback IPs, which Service endpoints reject.
        "metrics": {"service": {"enabled": False}},
        "operator": {
            "logFormat": "plain",
            "defaults": {"storage": {"endpoint": state.s3_endpoint, "region": state.s3_region}},
            "extraEnv": [
                {"name": "LMMR1_RESYNC_SECONDS", "value": "1"},
                {"name": "LMMR1_RESTART_BACKOFF_SECONDS", "value": "2"},
            ]
            if fast_clock
            else [],
            **(operator_values or {}),
        },
        **(chart_values or {}),
    }
    cli(
        state,
        "helm",
        "upgrade",
        "--install",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--create-namespace",
        "--wait",
        "--timeout",
        "120s",
        "-f",
        "-",
        stdin=json.dumps(values),
    )


def prepare_namespace(state: TestBedState, namespace: str) -> None:
    """The run's namespace and its S3 credentials Secret (what a user creates)."""
    cli(state, "kubectl", "create", "namespace", namespace, check=False)
    cli(state, "kubectl", "label", "namespace", namespace, RESTRICTED, "--overwrite")
    secret = cli(
        state,
        "kubectl",
        "create",
        "secret",
        "generic",
        "lmmr1-s3",
        "-n",
        namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={state.s3_access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={state.s3_secret_key}",
        "--dry-run=client",
        "-o",
        "yaml",
    ).stdout
    cli(state, "kubectl", "apply", "-n", namespace, "-f", "-", stdin=secret)


def example_run(**algorithm: Any) -> dict[str, Any]:
    """examples/run-tiny.yaml, optionally with algorithm overrides for every stage."""
    run = dict(yaml.safe_load(EXAMPLE.read_text()))
    for stage in run["spec"]["stages"]:
        stage["algorithm"] = {**stage.get("algorithm", {}), **algorithm}
    return run


def delete_run(state: TestBedState, namespace: str, name: str) -> None:
    """Remove a run left by an earlier demo on a kept test bed (its spec is immutable)."""
    cli(state, "kubectl", "delete", "lmr", name, "-n", namespace, "--ignore-not-found",
        "--wait", "--timeout=120s", check=False)  # fmt: skip


def apply_run(state: TestBedState, namespace: str, run: dict[str, Any]) -> str:
    cli(state, "kubectl", "apply", "-n", namespace, "-f", "-", stdin=json.dumps(run))
    return str(run["metadata"]["name"])


@dataclass
class Watch:
    """What following a run saw: every (stage, step, reward, accuracy) reported."""

    history: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def record(self, status: dict[str, Any]) -> bool:
        self.status = status
        stage, step, reward = status.get("stage"), status.get("step"), status.get("reward")
        if stage is None or step is None or reward is None:
            return False
        points = self.history.setdefault(stage, [])
        if points and points[-1][0] == step:
            return False
        points.append((int(step), float(reward), float(status.get("accuracy") or 0.0)))
        return True


def follow(
    state: TestBedState,
    namespace: str,
    name: str,
    *,
    timeout: float,
    on_change: Callable[[Watch], None] | None = None,
    poll: float = 1.0,
) -> Watch:
    """Poll the run until it Succeeds or Fails (or `timeout` passes)."""
    watch = Watch()
    started = time.monotonic()
    seen: tuple[Any, ...] = ()
    while time.monotonic() - started < timeout:
        result = cli(
            state, "kubectl", "get", "lmr", name, "-n", namespace, "-o", "json", check=False
        )
        if result.returncode == 0:
            status = json.loads(result.stdout).get("status") or {}
            changed = watch.record(status)
            now = (status.get("phase"), status.get("stage"), status.get("restarts"))
            if on_change is not None and (changed or now != seen):
                on_change(watch)
            seen = now
            if status.get("phase") in ("Succeeded", "Failed"):
                break
        time.sleep(poll)
    watch.seconds = time.monotonic() - started
    return watch


def trainer_logs(state: TestBedState, namespace: str, run: str) -> str:
    """The trainer containers' output on the process node (kubectl logs has no kubelet),
    every attempt's: the trainer Job's pods are `<run>-<stage>-t<attempt>-<index>-<random>`
    (lmmr1_operator.naming.trainer_job)."""
    pods = Path(state.run_dir) / "pods" / namespace
    chunks = []
    for log in sorted(pods.glob(f"{run}-*-t[0-9]*-*/trainer*.log")):
        chunks.append(f"== {log.parent.name}/{log.name}\n{log.read_text(errors='replace')}")
    return "\n".join(chunks)
