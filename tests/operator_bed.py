"""The operator on the test bed, as the operator's integration tests drive it: installed by
its own chart and running under that chart's RBAC on the process node (two replicas: kopf
peering lets one act). Runs land on the kwok GPU nodes; a test plays the trainer's part: it
reports progress into the run's progress ConfigMap with the pods' own service account,
commits checkpoints in the S3 server, and ends pods with an exit code."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lmmr1_testbed import runs
from lmmr1_testbed.demo import driver
from lmmr1_testbed.layout import REPO_ROOT, TestBedState
from lmmr1_testbed.pytest_plugin import Cli
from lmmr1_testbed.waiting import wait_for

CHART = str(REPO_ROOT / "charts" / "lmmr1")


class Bed:
    """The module's namespace with a running operator, and helpers to play the trainer."""

    def __init__(
        self,
        testbed: TestBedState,
        namespace: str,
        bucket: str,
        s3: Any,
        second_namespace: str = "",
    ) -> None:
        self.testbed = testbed
        self.ns = namespace
        self.second_ns = second_namespace  # also served by the operator (watchNamespaces)
        self.bucket = bucket
        self.s3 = s3
        self.kubectl = Cli(testbed, "kubectl", namespace)
        self.created: list[str] = []

    def wait(self, what: str, probe: Any, timeout: float = 60) -> Any:
        return wait_for(what, probe, timeout=timeout, state=self.testbed, namespace=self.ns)

    def apply_run(
        self,
        name: str,
        stages: int = 2,
        trainer_gpus: int = 4,
        rollout_mode: str | None = None,
        storage: dict[str, Any] | None = None,
        **spec: Any,
    ) -> None:
        """A run on the kwok GPU nodes; one trainer node, so colocated rollouts (no rollout
        pods) unless `rollout_mode` is "separate". `storage`: the test bed's S3 unless given."""
        mode = {"mode": rollout_mode} if rollout_mode else {}
        fre = runs.stage(
            "fre",
            "text",
            "s3://d/fre.jsonl",
            resources={
                "trainer": {"gpusPerNode": trainer_gpus},
                "rollout": {**mode, "replicas": 2, "gpusPerReplica": 1},
            },
        )
        mgt = runs.stage(
            "mgt",
            "multimodal",
            "s3://d/mgt.jsonl",
            algorithm={"learningRate": 1e-6},
            resources={
                "trainer": {"gpusPerNode": 4},
                "rollout": {**mode, "replicas": 1, "gpusPerReplica": 1},
            },
        )
        storage = storage or {
            "uri": f"s3://{self.bucket}/runs",
            "endpoint": self.testbed.s3_endpoint,
            "credentialsSecret": "s3",
        }
        spec.setdefault("backoffLimit", 2)
        run = runs.run(name, storage=storage, stages=[fre, mgt][:stages], **spec)
        self.kubectl("apply", "-f", "-", stdin=json.dumps(run))
        self.created.append(name)

    def cleanup(self) -> None:
        """Delete this test's runs: the simulated GPUs are shared by the module's tests."""
        for name in self.created:
            self.kubectl("delete", "lmr", name, "--ignore-not-found", "--wait=false")
        self.created.clear()

    def run(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.kubectl("get", "lmr", name, "-o", "json").stdout))

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.run(name).get("status") or {})

    def pods(self, selector: str) -> list[dict[str, Any]]:
        items = json.loads(self.kubectl("get", "pods", "-l", selector, "-o", "json").stdout)
        return [p for p in items["items"] if not p["metadata"].get("deletionTimestamp")]

    def running_trainer(self, run: str, stage: str) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            pods = self.pods(f"lmmr1.io/run={run},lmmr1.io/stage={stage},lmmr1.io/role=trainer")
            running = [p for p in pods if p["status"].get("phase") == "Running"]
            return running[0] if len(pods) == 1 and running else None

        return dict(self.wait(f"{run} {stage} trainer pod Running", probe))

    def report(self, run: str, **progress: Any) -> None:
        """Write progress as the trainer does: as the pods' service account."""
        body = {"updated_at": "2026-01-01T00:00:00Z", **progress}
        driver.report_progress(self.testbed, self.ns, run, body)

    def commit(self, run: str, stage: str, step: int) -> str:
        uid = self.run(run)["metadata"]["uid"]
        prefix = f"runs/{self.ns}/{run}/{uid}/{stage}/step-{step}"
        self.s3.put_object(Bucket=self.bucket, Key=f"{prefix}/model.safetensors", Body=b"w")
        self.s3.put_object(Bucket=self.bucket, Key=f"{prefix}/manifest.json", Body=b"{}")
        return f"s3://{self.bucket}/{prefix}"

    def exit(self, pod: dict[str, Any], code: int) -> None:
        self.kubectl(
            "annotate", "pod", pod["metadata"]["name"], f"testbed.lmmr1.io/exit-code={code}"
        )

    def disrupt(self, pod: dict[str, Any], reason: str, message: str) -> None:
        """End a pod as Kubernetes does when it preempts or evicts one: the condition
        DisruptionTarget and a Failed phase, written through pods/status as the scheduler
        and the kubelet write them (the containers end with SIGTERM's 143)."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ended = {
            "running": None,
            "terminated": {
                "exitCode": 143,
                "reason": "Error",
                "startedAt": now,
                "finishedAt": now,
            },
        }

        def statuses(containers: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [
                {"name": c["name"], "ready": False, "started": False, "state": ended}
                for c in containers
            ]

        spec = pod["spec"]
        patch = {
            "status": {
                "phase": "Failed",
                "conditions": [
                    {"type": "Ready", "status": "False", "lastTransitionTime": now},
                    {
                        "type": "DisruptionTarget",
                        "status": "True",
                        "reason": reason,
                        "message": message,
                        "lastTransitionTime": now,
                    },
                ],
                "containerStatuses": statuses(spec["containers"]),
                "initContainerStatuses": statuses(spec.get("initContainers") or []),
            }
        }
        self.kubectl(
            "patch",
            "pod",
            pod["metadata"]["name"],
            "--subresource=status",
            "--type=strategic",
            "-p",
            json.dumps(patch),
        )

    def finish_stage(self, run: str, stage: str, steps: int = 4) -> str:
        trainer = self.running_trainer(run, stage)
        final = self.commit(run, stage, steps)
        self.report(
            run,
            stage=stage,
            step=steps,
            total_steps=steps,
            reward=1.2,
            accuracy=0.8,
            last_checkpoint=final,
            final_checkpoint=final,
        )
        self.exit(trainer, 0)
        return final

    def phase(self, run: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        return dict(
            self.wait(
                f"{run} {phase}",
                lambda: (s := self.status(run)).get("phase") == phase and s,
                timeout,
            )
        )

    @contextmanager
    def condition_reasons(self, run: str, kind: str) -> Iterator[list[str]]:
        """Every state the run's `kind` condition takes while the block runs (as
        "reason: message"): a watch sees each status write, also one that the next pass
        overwrites within a second. (`-o json`: kubectl applies a jsonpath to the
        watch's later events as server-printed tables, which hold no status.)"""
        argv = [self.testbed.binary("kubectl"), "--namespace", self.ns, "get", "lmr", run]
        watch = subprocess.Popen(
            [*argv, "--watch", "-o", "json"],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **self.testbed.client_env()},
        )
        seen: list[str] = []
        try:
            yield seen
        finally:
            time.sleep(1)  # let the watch catch up with the last write
            watch.terminate()
            out, _ = watch.communicate(timeout=10)
            text, decoder = out.strip(), json.JSONDecoder()
            while text:  # one JSON object per watch event
                obj, end = decoder.raw_decode(text)
                text = text[end:].lstrip()
                seen += [
                    f"{c['reason']}: {c.get('message', '')}"
                    for c in (obj.get("status") or {}).get("conditions") or []
                    if c["type"] == kind
                ]

    def event_messages(self, run: str, reason: str) -> list[str]:
        out = self.kubectl(
            "get",
            "events",
            "--field-selector",
            f"involvedObject.name={run},involvedObject.kind=LMMR1Run,reason={reason}",
            "-o",
            "json",
        ).stdout
        return [str(e["message"]) for e in json.loads(out)["items"]]

    def events(self, run: str) -> list[str]:
        out = self.kubectl(
            "get",
            "events",
            "--field-selector",
            f"involvedObject.name={run},involvedObject.kind=LMMR1Run",
            "-o",
            "jsonpath={.items[*].reason}",
        ).stdout
        return out.split()


@contextmanager
def installed_operator(
    testbed: TestBedState,
    s3_client: Any,
    *,
    prefix: str = "t-operator",
    bed_class: type[Bed] = Bed,
    **values: Any,
) -> Iterator[Bed]:
    """The chart installed (two replicas, on the process node) serving two fresh restricted
    namespaces with an `s3` credentials Secret and a bucket; `values` override the chart's
    (a top-level key at a time). Uninstalled, and the namespaces deleted, on the way out."""
    namespace = f"{prefix}-{secrets.token_hex(3)}"
    second = f"{namespace}-b"  # a second served namespace, not the operator's own
    bucket = f"{prefix}-{secrets.token_hex(3)}"
    s3_client.create_bucket(Bucket=bucket)
    admin = Cli(testbed, "kubectl")
    for served in (namespace, second):
        admin("create", "namespace", served)
        admin("label", "namespace", served, "pod-security.kubernetes.io/enforce=restricted")
        admin(
            "create",
            "secret",
            "generic",
            "s3",
            "-n",
            served,
            f"--from-literal=AWS_ACCESS_KEY_ID={testbed.s3_access_key}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={testbed.s3_secret_key}",
        )
    chart_values = {
        "crds": {"enabled": False},
        "replicaCount": 2,
        # Process-node pod IPs are loopback addresses, which EndpointSlices reject.
        "metrics": {"service": {"enabled": False}},
        "watchNamespaces": [namespace, second],
        "nodeSelector": {"lmmr1.io/process-node": "true"},
        "tolerations": [{"key": "lmmr1.io/process-node", "operator": "Exists"}],
        "operator": {
            "logFormat": "plain",
            "extraEnv": [
                {"name": "LMMR1_RESYNC_SECONDS", "value": "1"},
                {"name": "LMMR1_RESTART_BACKOFF_SECONDS", "value": "1"},
            ],
        },
        **values,
    }
    helm = Cli(testbed, "helm", namespace)
    release = f"op-{secrets.token_hex(2)}"
    helm(
        "install",
        release,
        CHART,
        "-f",
        "-",
        "--wait",
        "--timeout",
        "90s",
        stdin=json.dumps(chart_values),
    )
    try:
        yield bed_class(testbed, namespace, bucket, s3_client, second_namespace=second)
    finally:
        helm("uninstall", release, check=False)
        for served in (namespace, second):
            admin("delete", "namespace", served, "--wait=false", check=False)
