"""A stage attempt as one JobSet (sigs.k8s.io/jobset v0.11.1, jobset.x-k8s.io/v1alpha2), so
that Kueue admits the trainer and its rollout servers as one gang: all of their pods get
quota, or none do, and a preemption takes them all back together.

Built from the trainer Job and rollout pod builders (their pods are the same); what differs
is only what JobSet does in their place: it names the Jobs and pods, creates the headless
Service that gives them DNS names, and sets each pod's subdomain. Used for runs with
spec.queueName (gang.py; docs/design.md, "The JobSet path")."""

from __future__ import annotations

import copy
from typing import Any

from lmmr1_operator import naming
from lmmr1_operator.api.spec import resolved_rollout_mode
from lmmr1_operator.children import rollout, trainer
from lmmr1_operator.children.context import StageContext

API_VERSION = "jobset.x-k8s.io/v1alpha2"
KIND = "JobSet"
TRAINER = "trainer"  # replicated job names: part of every pod's name (see naming.jobset)
ROLLOUT = "rollout"
ROLE = "jobset"  # the JobSet's own lmmr1.io/role label (its pods keep trainer/rollout)


def _without_queue(labels: dict[str, str]) -> dict[str, str]:
    """The JobSet alone is what Kueue queues: its Jobs and pods carry no queue of their own
    (Kueue treats a Job under a Kueue-managed JobSet as part of it anyway; this keeps one
    unit obvious to anyone reading the labels)."""
    return {k: v for k, v in labels.items() if k != naming.KUEUE_QUEUE}


def _trainer_master_addr(ctx: StageContext) -> str:
    """Rank 0 in the JobSet's DNS scheme: `<jobset>-trainer-0-0.<subdomain>`."""
    host = naming.jobset_pod_hostname(_name(ctx), TRAINER, 0, 0)
    return f"{host}.{_subdomain(ctx)}.{ctx.namespace}.svc"


def _name(ctx: StageContext) -> str:
    return naming.jobset(ctx.name, ctx.stage.name, ctx.attempt)


def _subdomain(ctx: StageContext) -> str:
    """One headless Service per attempt, named like the JobSet (JobSet's own default, made
    explicit). A subdomain shared by attempts would not do: JobSet creates the Service only
    when none of that name exists, selecting the pods of the JobSet that created it, and owned
    (so deleted) by that attempt's JobSet."""
    return _name(ctx)


def _trainer_replicated_job(ctx: StageContext) -> dict[str, Any]:
    job = trainer.job(ctx)
    spec = copy.deepcopy(job["spec"])
    pod = spec["template"]
    pod["metadata"]["labels"] = _without_queue(pod["metadata"]["labels"])
    # JobSet sets the subdomain (its own Service) on every pod; the trainer Service of the
    # Job-based layout is not used.
    pod["spec"].pop("subdomain", None)
    if ctx.stage.resources.trainer.nodes > 1:
        for container in pod["spec"]["containers"]:
            for env in container.get("env", []):
                if env["name"] == "MASTER_ADDR":
                    env["value"] = _trainer_master_addr(ctx)
    return {
        "name": TRAINER,
        "replicas": 1,
        "template": {
            "metadata": {"labels": _without_queue(job["metadata"]["labels"])},
            "spec": spec,
        },
    }


def _rollout_replicated_job(ctx: StageContext) -> dict[str, Any]:
    """The rollout servers as one Indexed Job, a server per completion index: its hostname
    (and so its URL) is stable, `<jobset>-rollout-0-<index>`. The index replaces the pod's
    replica annotation (`batch.kubernetes.io/job-completion-index` on each pod)."""
    replicas = ctx.stage.resources.rollout.replicas
    server = rollout.pod(ctx, 0)  # every replica's pod is the same but for its name
    labels = _without_queue(server["metadata"]["labels"])
    pod_spec = copy.deepcopy(server["spec"])
    # The Job controller names each pod's host after its index; JobSet sets the subdomain.
    pod_spec.pop("hostname", None)
    pod_spec.pop("subdomain", None)
    return {
        "name": ROLLOUT,
        "replicas": 1,
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                "completionMode": "Indexed",
                "completions": replicas,
                "parallelism": replicas,
                # As the trainer's: any failure, disruptions included, ends the attempt and
                # the operator restarts the whole stage from its last checkpoint.
                "backoffLimit": 0,
                "podFailurePolicy": copy.deepcopy(trainer.POD_FAILURE_POLICY),
                "template": {"metadata": {"labels": labels}, "spec": pod_spec},
            },
        },
    }


def separate(ctx: StageContext) -> bool:
    return resolved_rollout_mode(ctx.stage.resources) == "separate"


def rollout_urls(ctx: StageContext) -> list[str]:
    """The rollout servers' URLs, known before any pod exists: JobSet's DNS hostnames
    `<jobset>-rollout-0-<index>.<subdomain>` (namespace-qualified, as the trainer's master
    address is). Empty in colocate mode."""
    if not separate(ctx):
        return []
    name, subdomain = _name(ctx), _subdomain(ctx)
    return [
        f"http://{naming.jobset_pod_hostname(name, ROLLOUT, 0, index)}.{subdomain}"
        f".{ctx.namespace}.svc:{naming.ROLLOUT_PORT}"
        for index in range(ctx.stage.resources.rollout.replicas)
    ]


def jobset(ctx: StageContext) -> dict[str, Any]:
    """The attempt's JobSet. With a queue it is created suspended, and Kueue unsuspends it on
    admission. Kueue's mutating webhook would suspend it too (ApplyDefaultForSuspend,
    kueue v0.17.0 pkg/controller/jobframework/defaults.go); asking for it here does not
    depend on that webhook being registered: without Kueue the JobSet waits, visibly
    suspended, instead of starting unqueued."""
    labels = {
        **naming.stage_labels(ctx.name, ctx.stage.name, ROLE),
        naming.LABEL_ATTEMPT: str(ctx.attempt),
        # Kueue's queue. Its priority comes from the pods' priorityClassName (the run's
        # spec.priorityClassName, set on both replicated jobs' pods by pods.scheduling):
        # Kueue reads that when the JobSet has no kueue.x-k8s.io/priority-class label,
        # which would name a WorkloadPriorityClass, a kind the run does not refer to.
        **({naming.KUEUE_QUEUE: ctx.spec.queue_name} if ctx.spec.queue_name else {}),
    }
    replicated = [_trainer_replicated_job(ctx)]
    if separate(ctx):
        replicated.append(_rollout_replicated_job(ctx))
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": naming.child_metadata(ctx.run, _name(ctx), labels),
        "spec": {
            "replicatedJobs": replicated,
            # Rollout servers never complete: the attempt succeeds when the trainer does.
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [TRAINER]},
            # Restarts are the operator's (counted, a new attempt, from the last checkpoint).
            "failurePolicy": {"maxRestarts": 0},
            "network": {"enableDNSHostnames": True, "subdomain": _subdomain(ctx)},
            "suspend": bool(ctx.spec.queue_name),
        },
    }
