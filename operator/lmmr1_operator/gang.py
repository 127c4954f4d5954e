"""The JobSet path of the state machine (pure): a run with spec.queueName runs each stage
attempt as one JobSet that Kueue admits as a gang (docs/design.md, "The JobSet path").

Called from `reconcile._Decision` (passed in as `d`), whose helpers it uses: the restart,
disruption and stage-completion paths are the same as for a trainer Job. What differs:

- the attempt is one JobSet (`children.jobset.jobset`), with the stage ConfigMap written
  first, its rollout URLs known before any pod exists (`children.jobset.rollout_urls`);
- until Kueue admits the JobSet (and unsuspends it) the run is `Queued`, with Kueue's
  reason and message on the `Admitted` condition, and its deadline clock stopped;
- an eviction (a preemption, any Kueue eviction) is no failure and no new attempt: Kueue
  suspends the JobSet, its pods go, and on re-admission Kueue unsuspends the same JobSet,
  whose trainer resumes from its last committed checkpoint. Nothing of the pods is read
  then: pods ended by a suspension look failed (SIGTERM) and would count as a failure;
- a failure is the JobSet's own `Failed` condition (a child Job failed; failurePolicy
  maxRestarts 0), classified as today from the failed Job's condition and the pods'
  DisruptionTarget; success is its `Completed` condition (the trainer replicated job).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmmr1_operator import conditions as cond
from lmmr1_operator import kueue, podstate
from lmmr1_operator.children import access, jobset, stage_config

if TYPE_CHECKING:
    from lmmr1_operator.api.status import StageStatus
    from lmmr1_operator.children.context import StageContext
    from lmmr1_operator.reconcile import _Decision

Obj = dict[str, Any]
# Condition reasons and Event reasons of the JobSet path.
QUEUED = "Queued"
ADMITTED = "Admitted"
EVICTED = "Evicted"
PREEMPTED = "Preempted"
REQUEUED = "Requeued"  # admitted before, queued now, and the eviction itself went unseen
NOT_INSTALLED = "JobSetNotInstalled"
SUSPENDED = "Suspended"
NOT_INSTALLED_HINT = (
    "spec.queueName runs each stage as a JobSet (jobset.x-k8s.io/v1alpha2) that Kueue "
    "admits, and this cluster does not serve that API: install JobSet v0.11.1+ and Kueue "
    "v0.17.0+ (with the jobset.x-k8s.io/jobset integration enabled), or remove "
    "spec.queueName to run without gang admission"
)


def condition_true(obj: Obj | None, kind: str) -> dict[str, Any] | None:
    """The object's `kind` condition when it is True."""
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return dict(c)
    return None


def is_suspended(js: Obj) -> bool:
    return bool((js.get("spec") or {}).get("suspend"))


def admission(d: _Decision) -> kueue.Admission:
    """Where Kueue stands on the attempt's JobSet. Admitted means: Kueue admitted it AND
    unsuspended it (until then no pod may start)."""
    js, workload = d.seen.jobset, d.seen.workload
    if js is None:
        return kueue.Admission("queued", "Pending", "creating the stage's JobSet")
    if workload is None:
        return kueue.Admission(
            "queued",
            "Pending",
            f"no Kueue Workload for JobSet {js['metadata']['name']} yet: Kueue (v0.17.0+, "
            "with the jobset.x-k8s.io/jobset integration) makes one; if none appears, "
            "Kueue is not installed or does not manage JobSets",
        )
    said = kueue.admission(workload)
    if said.state == "admitted" and is_suspended(js):
        return kueue.Admission("queued", said.reason, f"{said.message}; Kueue unsuspends it")
    return said


def run_stage(d: _Decision, ctx: StageContext, record: StageStatus) -> None:
    """One pass over a stage attempt on the JobSet path."""
    seen = d.seen
    if jobset.separate(ctx):
        d.plan.ensure.append(access.rollout_network_policy(ctx))
    # The config before the JobSet (act() replaces before it ensures): its pods read it.
    config = stage_config.configmap(ctx, jobset.rollout_urls(ctx))
    if seen.config is None or (seen.config.get("data") or {}) != config["data"]:
        d.plan.replace.append(config)
    if seen.jobset is None:
        d.plan.ensure.append(jobset.jobset(ctx))
    if not_installed(d):
        return
    js = seen.jobset
    if js is not None and condition_true(js, "Completed"):
        left_queue(d, record)
        d.complete_stage(record)
        return
    if js is not None and (failure := condition_true(js, "Failed")):
        failed(d, ctx, js, failure)
        return
    said = admission(d)
    if said.state not in ("admitted", "finished"):
        queued(d, record, said)
        return
    left_queue(d, record)
    admitted(d, js, said)
    if d.config_error(ctx, [*seen.rollout_pods, *seen.trainer_pods]) or d.stalled(ctx):
        return
    d.progressing(record)


def not_installed(d: _Decision) -> bool:
    """The JobSet API is not served (its create was answered NotFound): a condition and one
    Warning Event naming what to install. The operator tries again every pass."""
    refused = next(
        (f for f in d.seen.create_failures if f.kind == jobset.KIND and f.reason == "NotFound"),
        None,
    )
    if refused is None:
        return False
    message = f"{NOT_INSTALLED_HINT} ({refused.name}: {refused.message})"
    previous = cond.get(d.status.conditions, cond.BLOCKED)
    if previous is None or previous.status != "True" or previous.reason != NOT_INSTALLED:
        d.event(NOT_INSTALLED, message, "Warning")
    d.condition(cond.BLOCKED, True, NOT_INSTALLED, message)
    d.condition(cond.ADMITTED, False, NOT_INSTALLED, message)
    d.condition(cond.RUNNING, False, NOT_INSTALLED, message)
    return True


def queued(d: _Decision, record: StageStatus, said: kueue.Admission) -> None:
    """Waiting for Kueue, or evicted by it: phase Queued, the deadline clock stopped, no
    stall watchdog, nothing counted. The JobSet stays: Kueue unsuspends it on admission."""
    status = d.status
    previous = cond.get(status.conditions, cond.ADMITTED)
    was_admitted = previous is not None and previous.status == "True"
    detail = f"{said.reason}: {said.message}" if said.reason else said.message
    if said.state == "evicted":
        reason = PREEMPTED if said.preempted else EVICTED
        if was_admitted or previous is None or previous.reason != reason:
            d.event(
                reason,
                f"stage {record.name}: Kueue took the JobSet's admission back ({detail}); "
                "its pods stop, and it resumes from its last checkpoint when admitted again "
                "(not counted against backoffLimit)",
                "Warning",
            )
    else:
        reason = QUEUED
        if was_admitted:  # the eviction came and went between two passes
            d.event(
                REQUEUED,
                f"stage {record.name}: Kueue queued the JobSet again ({detail}); it resumes "
                "from its last checkpoint when admitted again",
                "Warning",
            )
    if status.suspended_since is None:
        # Time in the queue is not active time: activeDeadlineSeconds counts neither it nor
        # a suspension (see `_Decision.active_seconds`).
        status.suspended_since = d.now
    status.phase = "Queued"
    status.last_progress_time = None  # no pods: the stall clock restarts with them
    d.condition(cond.ADMITTED, False, reason, detail)
    d.condition(cond.RUNNING, False, reason, f"stage {record.name}: {detail}")
    # A child the API server refused (the JobSet itself, by a webhook or a quota) would
    # otherwise leave the run Queued for a JobSet that never comes.
    refused = d.creation()
    if refused:
        d.condition(cond.BLOCKED, True, *refused)
    else:
        d.condition(cond.BLOCKED, False, reason)


def left_queue(d: _Decision, record: StageStatus) -> None:
    """Out of the queue: the time spent in it stays uncounted; the phase is the one the run
    had before it (Running once a trainer pod runs, see `_Decision.progressing`)."""
    status = d.status
    if status.phase != "Queued":
        return
    status.suspended_seconds = int(d.suspended_seconds())
    status.suspended_since = None
    status.phase = "Running" if (status.step or d.index) else "Pending"


def admitted(d: _Decision, js: Obj | None, said: kueue.Admission) -> None:
    """One Event per admission: when the condition turns True."""
    if not cond.is_true(d.status.conditions, cond.ADMITTED):
        name = js["metadata"]["name"] if js is not None else "?"
        d.event(
            ADMITTED,
            f"Kueue admitted JobSet {name} (queue {d.spec.queue_name}): {said.message}",
        )
    d.condition(cond.ADMITTED, True, ADMITTED, said.message)


def failed(d: _Decision, ctx: StageContext, js: Obj, failure: dict[str, Any]) -> None:
    """The JobSet failed: a child Job failed (failurePolicy maxRestarts 0). A disruption (a
    pod Kubernetes ended, or a Job failed by its pod failure policy for one) is restarted
    uncounted; anything else is a counted restart (or the end, past backoffLimit)."""
    left_queue(d, d.record())
    seen = d.seen
    pods = [*seen.rollout_pods, *seen.trainer_pods]
    if d.config_error(ctx, pods):
        return
    disrupted = d.disrupted_pods(pods)
    if disrupted:
        d.disrupted(ctx, disrupted)
        return
    for job in seen.jobset_jobs:
        message = podstate.job_disruption(job)
        if message is not None:
            d.disrupted(ctx, f"Job {job['metadata']['name']} failed: {message}")
            return
    said = str(failure.get("message") or failure.get("reason") or "")
    failed_pods = podstate.describe_failed([p for p in pods if podstate.phase(p) == "Failed"])
    d.restart(
        ctx,
        f"JobSet {js['metadata']['name']} failed ({said})"
        + (f": {failed_pods} failed" if failed_pods else ""),
    )


def suspended(d: _Decision) -> None:
    """spec.suspend on the JobSet path: as on the Job path, the stage's children (the JobSet
    with them) are deleted, and resuming creates the JobSet again, which Kueue queues anew.
    (Kueue owns a queued JobSet's spec.suspend: setting it would be undone on admission.)"""
    if d.spec.queue_name:
        d.condition(cond.ADMITTED, False, SUSPENDED, "spec.suspend is true: the JobSet is deleted")
