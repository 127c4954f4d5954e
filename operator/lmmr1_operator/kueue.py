"""What Kueue says about a stage attempt's JobSet, read from its Workload (pure).

Kueue (v0.17.0) makes one Workload per JobSet, in the JobSet's namespace, owned by it (a
controller ownerReference) and labelled `kueue.x-k8s.io/job-uid=<JobSet uid>`
(pkg/controller/jobframework/reconciler.go). Its conditions (apis/kueue/v1beta2/
workload_types.go, the same types and reasons in the deprecated v1beta1):

- `QuotaReserved`: True once the ClusterQueue reserved quota; False with reason `Pending` and
  the scheduler's message (e.g. "couldn't assign flavors to pod set trainer: insufficient
  unused quota for nvidia.com/gpu in flavor default, 8 more needed"), or `Inadmissible`
  ("LocalQueue q doesn't exist", "... is inactive", a ClusterQueue that is missing or
  stopped);
- `Admitted`: True when quota is reserved and every admission check is Ready (then Kueue
  unsuspends the JobSet); False says what is missing (`NoReservation`, `UnsatisfiedChecks`);
- `Evicted`: True with reason `Preempted`, `PodsReadyTimeout`, `AdmissionCheck`,
  `ClusterQueueStopped`, `LocalQueueStopped`, `Deactivated`, `NodeFailures`, ...: Kueue
  suspends the JobSet (its pods go) and requeues the Workload, unless deactivated. It turns
  False ("Previously: ...") when quota is reserved again;
- `Preempted`: True beside `Evicted` (reason Preempted) with the detail: `InClusterQueue`,
  `InCohortReclamation`, `InCohortFairSharing`, `InCohortReclaimWhileBorrowing`;
- `Finished`: True when the JobSet finished, reason `Succeeded` or `Failed`;
- `PodsReady`: only with waitForPodsReady configured; its timeout shows as an eviction
  (reason `PodsReadyTimeout`), so it is not read here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"

QUOTA_RESERVED = "QuotaReserved"
ADMITTED = "Admitted"
EVICTED = "Evicted"
PREEMPTED = "Preempted"
FINISHED = "Finished"
EVICTED_BY_PREEMPTION = "Preempted"  # the Evicted condition's reason

State = Literal["queued", "admitted", "evicted", "finished"]


@dataclass(frozen=True)
class Admission:
    """Where the Workload stands. `queued`: waiting for quota or admission checks (reason
    and message say why, as Kueue put them); `admitted`: the JobSet may run; `evicted`: its
    quota was taken back (or is being), `preempted` when by a higher-priority or reclaiming
    workload, with Kueue's detailed reason; `finished`: reason Succeeded or Failed."""

    state: State
    reason: str
    message: str
    preempted: bool = False


def _conditions(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        c["type"]: c for c in (workload.get("status") or {}).get("conditions") or [] if "type" in c
    }


def _true(condition: dict[str, Any] | None) -> bool:
    return condition is not None and condition.get("status") == "True"


def _said(condition: dict[str, Any]) -> tuple[str, str]:
    return str(condition.get("reason", "")), str(condition.get("message", ""))


def admission(workload: dict[str, Any]) -> Admission:
    """The Workload's state from its conditions. An eviction outranks admission: while Kueue
    stops the pods the Workload can still hold its quota (QuotaReserved and Admitted True
    beside Evicted True), and the attempt is already lost."""
    conditions = _conditions(workload)
    finished = conditions.get(FINISHED)
    if _true(finished):
        assert finished is not None
        return Admission("finished", *_said(finished))
    evicted = conditions.get(EVICTED)
    if _true(evicted):
        assert evicted is not None
        preempted = conditions.get(PREEMPTED)
        if _true(preempted):
            assert preempted is not None
            return Admission("evicted", *_said(preempted), preempted=True)
        reason, message = _said(evicted)
        return Admission("evicted", reason, message, preempted=reason == EVICTED_BY_PREEMPTION)
    admitted = conditions.get(ADMITTED)
    if _true(admitted):
        assert admitted is not None
        return Admission("admitted", *_said(admitted))
    reserved = conditions.get(QUOTA_RESERVED)
    if reserved is None:
        return Admission("queued", "Pending", "waiting for Kueue to consider the workload")
    if _true(reserved) and admitted is not None:
        # Quota is held; admission checks (or topology assignment) are not all ready.
        return Admission("queued", *_said(admitted))
    return Admission("queued", *_said(reserved))


def workload_selector(jobset: dict[str, Any]) -> str:
    """The label selector that lists the JobSet's Workload (in the JobSet's namespace)."""
    return f"{JOB_UID_LABEL}={jobset['metadata']['uid']}"


def workload_for(jobset: dict[str, Any], workloads: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The JobSet's Workload among `workloads` (e.g. those `workload_selector` listed): the
    one it controls, by UID, as the run's own children are matched (a JobSet deleted and
    created again under its name has a new UID and a new Workload). None until Kueue made
    it."""
    uid = jobset["metadata"]["uid"]
    namespace = jobset["metadata"].get("namespace")
    for workload in workloads:
        meta = workload["metadata"]
        if namespace is not None and meta.get("namespace") not in (None, namespace):
            continue
        refs = meta.get("ownerReferences") or []
        if any(
            ref.get("uid") == uid and ref.get("controller") and ref.get("kind") == "JobSet"
            for ref in refs
        ):
            return workload
    return None
