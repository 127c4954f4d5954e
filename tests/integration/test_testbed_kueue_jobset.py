"""The test bed's Kueue and JobSet: the real controllers admit JobSets as a unit.

This checks the ground that the operator's gang path stands on (issue 15): CRDs installed,
webhooks reached over loopback, Kueue's quota on the kwok GPU nodes, JobSet creating Jobs
and pods once admitted. The JobSets here are minimal, written by hand.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from lmmr1_testbed import batch
from lmmr1_testbed.layout import TestBedState
from lmmr1_testbed.pytest_plugin import Cli, WaitFor

pytestmark = pytest.mark.batch
GPU_QUOTA = {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}

Obj = dict[str, Any]


def gpu_jobset(name: str, queue: str, gpus: int) -> Obj:
    container = {
        "name": "work",
        "image": "registry.invalid/work:1",
        "resources": {
            "requests": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": str(gpus)},
            "limits": {"nvidia.com/gpu": str(gpus)},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "labels": {"kueue.x-k8s.io/queue-name": queue}},
        "spec": {
            "replicatedJobs": [
                {
                    "name": "work",
                    "replicas": 1,
                    "template": {
                        "spec": {
                            "parallelism": 1,
                            "completions": 1,
                            "backoffLimit": 0,
                            "template": {
                                "spec": {
                                    "restartPolicy": "Never",
                                    "nodeSelector": {"type": "kwok"},
                                    "containers": [container],
                                }
                            },
                        }
                    },
                }
            ]
        },
    }


def items(kubectl: Cli, kind: str, *selector: str) -> list[Obj]:
    listed: list[Obj] = json.loads(kubectl("get", kind, *selector, "-o", "json").stdout)["items"]
    return listed


def workload_of(kubectl: Cli, jobset: str) -> Obj | None:
    for workload in items(kubectl, "workloads.kueue.x-k8s.io"):
        owners = workload["metadata"].get("ownerReferences", [])
        if any(owner["kind"] == "JobSet" and owner["name"] == jobset for owner in owners):
            return workload
    return None


def condition(obj: Obj | None, kind: str) -> Obj | None:
    for entry in (obj or {}).get("status", {}).get("conditions", []):
        if entry["type"] == kind:
            return dict(entry)
    return None


def test_two_jobsets_of_8_gpus_are_admitted_one_at_a_time_with_no_partial_pods(
    batch_controllers: TestBedState, namespace: str, kubectl: Cli, wait: WaitFor
) -> None:
    queue = f"q-{namespace}"[:63]
    setup = {"apiVersion": "v1", "kind": "List", "items": batch.queue(queue, namespace, GPU_QUOTA)}
    kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(setup))
    try:
        kubectl("create", "-f", "-", stdin=json.dumps(gpu_jobset("first", queue, 8)))

        def admitted(name: str) -> bool:
            found = condition(workload_of(kubectl, name), "Admitted")
            return bool(found and found["status"] == "True")

        wait("the first JobSet admitted", lambda: admitted("first"), timeout=60)
        wait(
            "the first JobSet's pod running",
            lambda: [
                pod
                for pod in items(kubectl, "pods", "-l", "jobset.sigs.k8s.io/jobset-name=first")
                if pod["status"].get("phase") == "Running"
            ],
            timeout=60,
        )
        # JobSet's webhook defaulted it; Kueue unsuspended it when it admitted it.
        first = json.loads(kubectl("get", "jobset", "first", "-o", "json").stdout)
        assert first["spec"]["suspend"] is False

        kubectl("create", "-f", "-", stdin=json.dumps(gpu_jobset("second", queue, 8)))
        pending = wait(
            "the second JobSet's Workload pending for quota",
            lambda: (
                (found := condition(workload_of(kubectl, "second"), "QuotaReserved"))
                and found["status"] == "False"
                and found
            ),
            timeout=60,
        )
        assert "nvidia.com/gpu" in pending["message"], pending
        second = json.loads(kubectl("get", "jobset", "second", "-o", "json").stdout)
        assert second["spec"]["suspend"] is True
        assert items(kubectl, "pods", "-l", "jobset.sigs.k8s.io/jobset-name=second") == []

        kubectl("delete", "jobset", "first", "--wait=true")
        wait("the second JobSet admitted once the first is gone", lambda: admitted("second"))
        wait(
            "the second JobSet's pod",
            lambda: items(kubectl, "pods", "-l", "jobset.sigs.k8s.io/jobset-name=second"),
        )
    finally:
        kubectl("delete", "jobsets", "--all", "--wait=true", check=False)
        # ClusterQueues and ResourceFlavors carry finalizers that only a running Kueue
        # removes: delete them while it runs.
        for kind in ("localqueue", "clusterqueue", "resourceflavor"):
            kubectl("delete", kind, queue, "--wait=true", check=False, timeout=60)
