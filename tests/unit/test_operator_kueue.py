"""Reading Kueue's Workload for a stage attempt's JobSet (kueue.py). The Workloads are built
as Kueue v0.17.0 writes them (conditions, reasons and messages from its source) and checked
against Kueue's Workload CRD schema (v1beta1 and v1beta2, vendored in tests/fixtures) before
they are read, so a fixture cannot drift into something Kueue would never store."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from tests import kube_schema
from tests.stage_contexts import run_object, stage_context

from lmmr1_operator import kueue
from lmmr1_operator.children import jobset

VERSIONS = ("v1beta1", "v1beta2")
JOBSET_UID = "0b7c5e4e-5f43-4c36-9d2c-1f0c1f6f7a01"
NO_QUOTA = (
    "couldn't assign flavors to pod set trainer: insufficient unused quota for nvidia.com/gpu "
    "in flavor default, 8 more needed"
)
PREEMPTION = (
    "Preempted to accommodate a workload (UID: 5d9a, JobUID: 77c1) due to prioritization in "
    "the ClusterQueue"
)


def the_jobset() -> dict[str, Any]:
    """A stage attempt's JobSet (separate mode) as the API server returns it."""
    run = run_object(queueName="team-a")
    run["metadata"]["uid"] = "run-uid"
    run["spec"]["stages"][0]["resources"] = {"rollout": {"mode": "separate", "replicas": 2}}
    js = jobset.jobset(stage_context(run))
    js["metadata"]["uid"] = JOBSET_UID
    return js


def workload_of(js: dict[str, Any], *conditions: dict[str, Any]) -> dict[str, Any]:
    """The Workload Kueue makes for `js` (jobframework: a pod set per replicated job, owned by
    the JobSet, labelled with its UID), with `conditions` as its status."""
    meta = js["metadata"]
    workload: dict[str, Any] = {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {
            "name": f"jobset-{meta['name']}-3f2a1",
            "namespace": meta["namespace"],
            "labels": {kueue.JOB_UID_LABEL: meta["uid"]},
            "ownerReferences": [
                {
                    "apiVersion": js["apiVersion"],
                    "kind": "JobSet",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "queueName": meta["labels"]["kueue.x-k8s.io/queue-name"],
            "podSets": [
                {
                    "name": rjob["name"],
                    "count": rjob["template"]["spec"]["parallelism"],
                    "template": rjob["template"]["spec"]["template"],
                }
                for rjob in js["spec"]["replicatedJobs"]
            ],
        },
    }
    if conditions:
        workload["status"] = {"conditions": list(conditions)}
    if any(c["type"] == kueue.QUOTA_RESERVED and c["status"] == "True" for c in conditions):
        workload["status"]["admission"] = {
            "clusterQueue": "cluster",
            "podSetAssignments": [
                {
                    "name": ps["name"],
                    "count": ps["count"],
                    "flavors": {"cpu": "default", "memory": "default"},
                    "resourceUsage": {"cpu": "4", "memory": "8Gi"},
                }
                for ps in workload["spec"]["podSets"]
            ],
        }
    return workload


def cond(kind: str, status: bool, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-12-01T12:00:00Z",
        "observedGeneration": 1,
    }


RESERVED = cond(
    kueue.QUOTA_RESERVED, True, "QuotaReserved", "Quota reserved in ClusterQueue cluster"
)
ADMITTED = cond(kueue.ADMITTED, True, "Admitted", "The workload is admitted")
NOT_ADMITTED = cond(kueue.ADMITTED, False, "NoReservation", "The workload has no reservation")
PREEMPTED = cond(kueue.PREEMPTED, True, "InClusterQueue", PREEMPTION)
EVICTED_BY_PREEMPTION = cond(kueue.EVICTED, True, "Preempted", PREEMPTION)

# (conditions as Kueue leaves them, what the operator reads)
CASES: dict[str, tuple[list[dict[str, Any]], kueue.Admission]] = {
    "new": ([], kueue.Admission("queued", "Pending", "waiting for Kueue to consider the workload")),
    "no-quota": (
        [cond(kueue.QUOTA_RESERVED, False, "Pending", NO_QUOTA)],
        kueue.Admission("queued", "Pending", NO_QUOTA),
    ),
    "no-local-queue": (
        [cond(kueue.QUOTA_RESERVED, False, "Inadmissible", "LocalQueue team-a doesn't exist")],
        kueue.Admission("queued", "Inadmissible", "LocalQueue team-a doesn't exist"),
    ),
    "checks-pending": (
        [
            RESERVED,
            cond(
                kueue.ADMITTED, False, "UnsatisfiedChecks", "The workload has not all checks ready"
            ),
        ],
        kueue.Admission("queued", "UnsatisfiedChecks", "The workload has not all checks ready"),
    ),
    "admitted": (
        [RESERVED, ADMITTED],
        kueue.Admission("admitted", "Admitted", "The workload is admitted"),
    ),
    # Kueue stops the pods while the quota is still held: the attempt is lost already.
    "being-preempted": (
        [RESERVED, ADMITTED, EVICTED_BY_PREEMPTION, PREEMPTED],
        kueue.Admission("evicted", "InClusterQueue", PREEMPTION, preempted=True),
    ),
    "preempted-and-requeued": (
        [
            cond(kueue.QUOTA_RESERVED, False, "Pending", NO_QUOTA),
            NOT_ADMITTED,
            EVICTED_BY_PREEMPTION,
            PREEMPTED,
            cond("Requeued", True, "Preempted", PREEMPTION),
        ],
        kueue.Admission("evicted", "InClusterQueue", PREEMPTION, preempted=True),
    ),
    "pods-ready-timeout": (
        [
            cond(kueue.QUOTA_RESERVED, False, "Pending", NO_QUOTA),
            NOT_ADMITTED,
            cond(kueue.EVICTED, True, "PodsReadyTimeout", "Exceeded the PodsReady timeout ns/w"),
        ],
        kueue.Admission("evicted", "PodsReadyTimeout", "Exceeded the PodsReady timeout ns/w"),
    ),
    # Quota reserved again: Kueue turns Evicted and Preempted False ("Previously: ...").
    "readmitted": (
        [
            RESERVED,
            ADMITTED,
            cond(kueue.EVICTED, False, "QuotaReserved", f"Previously: {PREEMPTION}"),
            cond(kueue.PREEMPTED, False, "QuotaReserved", f"Previously: {PREEMPTION}"),
        ],
        kueue.Admission("admitted", "Admitted", "The workload is admitted"),
    ),
    "succeeded": (
        [RESERVED, ADMITTED, cond(kueue.FINISHED, True, "Succeeded", "jobset completed")],
        kueue.Admission("finished", "Succeeded", "jobset completed"),
    ),
    "failed": (
        [RESERVED, ADMITTED, cond(kueue.FINISHED, True, "Failed", "jobset failed")],
        kueue.Admission("finished", "Failed", "jobset failed"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_workloads_state_is_what_kueue_says(case: str) -> None:
    conditions, expected = CASES[case]
    workload = workload_of(the_jobset(), *conditions)
    for version in VERSIONS:
        assert kube_schema.errors(workload, kube_schema.WORKLOAD, version) == [], version
    assert kueue.admission(workload) == expected


def test_the_workload_schema_rejects_what_kueue_would_not_store() -> None:
    good = workload_of(the_jobset(), RESERVED, ADMITTED)
    misspelt = copy.deepcopy(good)
    misspelt["status"]["conditions"][0]["lastTransitionTme"] = "2026-12-01T12:00:00Z"
    spaced = copy.deepcopy(good)
    spaced["status"]["conditions"][1]["reason"] = "Not admitted"  # reasons are CamelCase
    no_type = copy.deepcopy(good)
    del no_type["status"]["conditions"][0]["type"]
    for version in VERSIONS:
        assert any(
            "lastTransitionTme" in e
            for e in kube_schema.errors(misspelt, kube_schema.WORKLOAD, version)
        )
        assert any(
            "Not admitted" in e for e in kube_schema.errors(spaced, kube_schema.WORKLOAD, version)
        )
        assert any(
            "'type' is a required property" in e
            for e in kube_schema.errors(no_type, kube_schema.WORKLOAD, version)
        )


def test_the_jobsets_workload_is_the_one_it_controls() -> None:
    js = the_jobset()
    mine = workload_of(js, RESERVED, ADMITTED)
    # The JobSet of the same name before it was deleted and created again: another UID.
    old = copy.deepcopy(js)
    old["metadata"]["uid"] = "an-older-jobset"
    theirs = workload_of(old)
    # Owned, but not as its controller.
    bystander = copy.deepcopy(mine)
    bystander["metadata"]["ownerReferences"][0]["controller"] = False

    assert kueue.workload_selector(js) == f"kueue.x-k8s.io/job-uid={JOBSET_UID}"
    assert kueue.workload_for(js, [theirs, bystander, mine]) is mine
    assert kueue.workload_for(js, [theirs, bystander]) is None
    assert kueue.workload_for(js, []) is None
