"""Deterministic names and labels of a run's children (pure)."""

from __future__ import annotations

import hashlib
from typing import Any

from lmmr1_operator.api import API_VERSION, KIND

LABEL_RUN = "lmmr1.io/run"
LABEL_STAGE = "lmmr1.io/stage"
LABEL_ROLE = "lmmr1.io/role"
# Which attempt of the stage a pod belongs to (the stage's restart count): children of an
# older attempt are stale and removed, whatever else happened in between.
LABEL_ATTEMPT = "lmmr1.io/attempt"
# Which replica a rollout pod serves (its name says it too, but children are never matched
# by name).
ANNOTATION_REPLICA = "lmmr1.io/replica"
LABEL_MANAGED = "app.kubernetes.io/managed-by"
MANAGER = "lmmr1-operator"
KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"

ROLLOUT_PORT = 8000
VERIFIER_PORT = 5000
RENDEZVOUS_PORT = 29500


def run_labels(run: str) -> dict[str, str]:
    return {LABEL_RUN: run, LABEL_MANAGED: MANAGER}


def stage_labels(run: str, stage: str, role: str) -> dict[str, str]:
    return {**run_labels(run), LABEL_STAGE: stage, LABEL_ROLE: role}


# How many attempts apart two attempts' names repeat. The attempt is in the names of its
# workload children so that a restarted stage's children never share a name with the last
# attempt's, still terminating: the new ones are created at once instead of waiting for the
# old ones to be gone. Three digits keep every name a DNS label (see MAX_STAGE_NAME in
# api/spec.py); an attempt 1000 restarts back is long gone, and children are matched by
# their owner's UID and their attempt label anyway, never by name alone.
ATTEMPTS_NAMED = 1000


def _attempt(attempt: int) -> str:
    return str(attempt % ATTEMPTS_NAMED)


def rollout_pod(run: str, stage: str, attempt: int, replica: int) -> str:
    """A rollout server of one attempt (also its hostname, under the rollout Service)."""
    return f"{run}-{stage}-r{_attempt(attempt)}-{replica}"


def rollout_service(run: str, stage: str) -> str:
    return f"{run}-{stage}-rollout"


def trainer_job(run: str, stage: str, attempt: int) -> str:
    """The trainer Job of one attempt; its pods' hostnames are `<job>-<index>`."""
    return f"{run}-{stage}-t{_attempt(attempt)}"


# A JobSet's pods are named `<jobset>-<replicatedJob>-<jobIndex>-<podIndex>-<5 random>`,
# which its webhook wants a DNS-1035 label (at most 63 characters), checked with the
# largest indices (sigs.k8s.io/jobset v0.11.1, pkg/webhooks/jobset_webhook.go). With the
# replicated jobs `trainer` and `rollout` (7 characters), one Job each (job index 0) and at
# most 256 pods (pod index up to 3 digits): 63 - len("-trainer-0-") - 3 - len("-abcde").
MAX_JOBSET_NAME = 63 - 11 - 3 - 6
_NAME_HASH = 6  # hex digits of the shortened name's hash


def jobset(run: str, stage: str, attempt: int) -> str:
    """The JobSet of one attempt (trainer and rollout servers, admitted by Kueue as one):
    `<run>-<stage>-g<attempt>`, or, when that is too long for its pods' names, the run and
    stage cut short and a hash of both in their place (deterministic, and still distinct
    between two stages whose names share the beginning)."""
    suffix = f"-g{_attempt(attempt)}"
    base = f"{run}-{stage}"
    if len(base) + len(suffix) > MAX_JOBSET_NAME:
        digest = hashlib.sha256(f"{run}/{stage}".encode()).hexdigest()[:_NAME_HASH]
        keep = MAX_JOBSET_NAME - len(suffix) - 1 - _NAME_HASH
        base = f"{base[:keep].rstrip('-')}-{digest}"
    return base + suffix


def jobset_pod_hostname(jobset_name: str, replicated_job: str, job_index: int, pod: int) -> str:
    """An Indexed Job's pod has the hostname `<job>-<completion index>`, and JobSet names its
    Jobs `<jobset>-<replicatedJob>-<jobIndex>` (placement.GenJobName, jobset v0.11.1)."""
    return f"{jobset_name}-{replicated_job}-{job_index}-{pod}"


def trainer_service(run: str, stage: str) -> str:
    """The trainer's headless Service, one per stage (every attempt's pods use it as their
    subdomain: `<job>-<index>.<service>` resolves to a rank)."""
    return f"{run}-{stage}-trainer"


def stage_config(run: str, stage: str) -> str:
    return f"{run}-{stage}-config"


def rollout_policy(run: str, stage: str) -> str:
    return f"{run}-{stage}-rollout"


def trainer_policy(run: str, stage: str) -> str:
    return f"{run}-{stage}-trainer"


def progress_configmap(run: str) -> str:
    return f"{run}-progress"


def progress_role(run: str) -> str:
    return f"{run}-progress"


def token_secret(run: str) -> str:
    return f"{run}-rollout-token"


def owner_reference(run: dict[str, Any]) -> dict[str, Any]:
    """Children are owned by the run: deleting it garbage-collects them all."""
    meta = run["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_by(obj: dict[str, Any] | None, uid: str) -> bool:
    """Whether `obj` is a child of the run with this UID. Children are matched by owner,
    never by name or label alone: a run deleted and created again under the same name must
    not adopt the old run's children (its progress report, its Job) while the garbage
    collector removes them."""
    if obj is None:
        return False
    refs = obj["metadata"].get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


def name_taken(obj: dict[str, Any]) -> str:
    """Why a child cannot be created: an object of its name exists that is not this run's."""
    meta = obj["metadata"]
    owners = ", ".join(
        f"{ref.get('kind')} {ref.get('name')} uid {ref.get('uid')}"
        for ref in meta.get("ownerReferences") or []
    )
    return (
        f"{meta['name']} already exists and is not this run's (owned by {owners or 'nothing'}); "
        "a deleted run's children go once the garbage collector removes them, an orphaned "
        "one must be deleted by hand"
    )


def child_metadata(run: dict[str, Any], name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": run["metadata"]["namespace"],
        "labels": labels,
        "ownerReferences": [owner_reference(run)],
    }
