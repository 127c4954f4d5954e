"""The JobSet path of the state machine (gang.py): a run with spec.queueName runs each stage
attempt as one JobSet that Kueue admits. Scenario by scenario with no cluster; the JobSets
the operator builds and the JobSets and Workloads it reads are checked against the real
CRD schemas (tests/fixtures/kube_crds), so no fixture drifts into something JobSet or
Kueue would never store."""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import replace
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError
from tests import kube_schema
from tests.stage_contexts import stage_context
from tests.unit.test_operator_controller import FakeKube, condition, controller
from tests.unit.test_operator_controller import new_run as controller_run
from tests.unit.test_operator_kueue import (
    ADMITTED,
    EVICTED_BY_PREEMPTION,
    NO_QUOTA,
    PREEMPTED,
    RESERVED,
    cond,
    workload_of,
)
from tests.unit.test_operator_reconcile import (
    NOW,
    SETTINGS,
    conditions,
    finished_report,
    kinds,
    new_run,
    pod,
    seen,
    stage_yaml,
    with_status,
)

from lmmr1_operator import kube as kube_module
from lmmr1_operator import kueue, naming
from lmmr1_operator.children import jobset
from lmmr1_operator.kube import CreateRefused, Kube
from lmmr1_operator.reconcile import CreateFailure, Observed, Plan, decide

Obj = dict[str, Any]
QUEUE = "team-a"
JOBSET = "r-fre-g0"
JOBSET_UID = "js-uid-0"
REQUEUED = cond(kueue.QUOTA_RESERVED, False, "Pending", NO_QUOTA)
SIGTERMED = 143  # how a pod that Kueue's suspension stopped ends: no DisruptionTarget


def at(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


def queued_run(rollout_mode: str | None = "separate", **spec: Any) -> Obj:
    return new_run(rollout_mode, queueName=QUEUE, **spec)


def jobset_condition(kind: str, message: str, reason: str = "") -> Obj:
    return {
        "type": kind,
        "status": "True",
        "reason": reason or kind,
        "message": message,
        "lastTransitionTime": "2026-01-01T12:00:00Z",
    }


def as_stored(plan: Plan, suspend: bool = True, *conditions_: Obj) -> Obj:
    """The JobSet `plan` creates, as the API server returns it (uid; Kueue's suspend; JobSet
    controller's conditions), valid against the JobSet CRD's schema."""
    (created,) = [o for o in plan.ensure if o["kind"] == jobset.KIND]
    stored = copy.deepcopy(created)
    stored["metadata"]["uid"] = JOBSET_UID
    stored["spec"]["suspend"] = suspend
    if conditions_:
        stored["status"] = {"conditions": list(conditions_)}
    assert kube_schema.errors(stored, kube_schema.JOBSET, "v1alpha2") == []
    return stored


def workload(js: Obj, *conditions_: Obj) -> Obj:
    found = workload_of(js, *conditions_)
    assert kube_schema.errors(found, kube_schema.WORKLOAD, "v1beta2") == []
    return found


def first_pass(run: Obj | None = None) -> tuple[Obj, Plan]:
    run = run or queued_run()
    plan = decide(seen(run), SETTINGS)
    return with_status(run, plan), plan


def condition_of(plan: Plan, kind: str) -> Obj:
    return dict(next(c for c in plan.status["conditions"] if c["type"] == kind))


def admitted_world(run: Obj, plan: Plan, **kwargs: Any) -> Observed:
    js = as_stored(plan, False)
    return seen(
        run,
        jobset=js,
        workload=workload(js, RESERVED, ADMITTED),
        config=next(o for o in plan.replace if o["kind"] == "ConfigMap"),
        stage_children_exist=True,
        **kwargs,
    )


def trainer_pod(phase: str = "Running", exit_code: int | None = None) -> Obj:
    return pod(f"{JOBSET}-trainer-0-0-x1", phase, container="trainer", exit_code=exit_code)


def test_a_queued_run_creates_its_config_and_one_jobset_and_no_job_service_or_pods() -> None:
    run, plan = first_pass()
    created = kinds(plan.ensure)
    assert f"JobSet/{JOBSET}" in created
    assert not [k for k in created if k.startswith(("Job/", "Pod/", "Service/"))], created
    # Both stage policies come before the JobSet's pods can exist.
    policies = [k for k in created if k.startswith("NetworkPolicy/")]
    assert policies == ["NetworkPolicy/r-fre-trainer", "NetworkPolicy/r-fre-rollout"]
    assert max(map(created.index, policies)) < created.index(f"JobSet/{JOBSET}")
    # The config is written at once (act() replaces before it ensures): the rollout URLs are
    # the JobSet's DNS names, known before any pod exists.
    assert kinds(plan.replace) == ["ConfigMap/r-fre-config"]
    ctx = stage_context(run)
    assert stage_yaml(plan)["rollout"]["urls"] == jobset.rollout_urls(ctx)
    assert stage_yaml(plan)["rollout"]["urls"][0].startswith(f"http://{JOBSET}-rollout-0-0.")
    (built,) = [o for o in plan.ensure if o["kind"] == jobset.KIND]
    assert kube_schema.errors(built, kube_schema.JOBSET, "v1alpha2") == []
    assert built["spec"]["suspend"] is True
    assert built["metadata"]["labels"][naming.KUEUE_QUEUE] == QUEUE
    assert plan.status["phase"] == "Queued"
    assert conditions(plan)["Admitted"] == "False"


def test_a_run_without_a_queue_keeps_its_trainer_job() -> None:
    plan = decide(seen(new_run("separate")), SETTINGS)
    assert not [k for k in kinds(plan.ensure) if k.startswith("JobSet/")]
    assert "Pod/r-fre-r0-0" in kinds(plan.ensure)
    assert plan.status["phase"] == "Pending" and "Admitted" not in conditions(plan)


def test_queued_shows_kueues_reason_and_message_and_counts_nothing() -> None:
    run, plan = first_pass()
    js = as_stored(plan)
    world = seen(run, jobset=js, workload=workload(js, REQUEUED), stage_children_exist=True)
    plan = decide(world, SETTINGS)
    admitted = condition_of(plan, "Admitted")
    assert (admitted["status"], admitted["reason"]) == ("False", "Queued")
    assert admitted["message"] == f"Pending: {NO_QUOTA}"
    assert plan.status["phase"] == "Queued" and not plan.events
    assert plan.status["restarts"] == 0 and not plan.delete_stage
    assert condition_of(plan, "Running")["status"] == "False"
    # Nothing to do until Kueue moves: the plan only ensures what exists.
    again = decide(replace(world, run=with_status(run, plan)), SETTINGS)
    assert again.status == plan.status and not again.events


def test_a_queue_that_does_not_exist_shows_kueues_message() -> None:
    run, plan = first_pass()
    js = as_stored(plan)
    missing = cond(kueue.QUOTA_RESERVED, False, "Inadmissible", f"LocalQueue {QUEUE} doesn't exist")
    plan = decide(seen(run, jobset=js, workload=workload(js, missing)), SETTINGS)
    message = condition_of(plan, "Admitted")["message"]
    assert message == f"Inadmissible: LocalQueue {QUEUE} doesn't exist"
    assert plan.status["phase"] == "Queued"


def test_a_jobset_kueue_never_picks_up_says_so() -> None:
    run, plan = first_pass()
    plan = decide(seen(run, jobset=as_stored(plan)), SETTINGS)
    message = condition_of(plan, "Admitted")["message"]
    assert "no Kueue Workload for JobSet r-fre-g0" in message and "v0.17.0" in message


def test_admission_is_one_event_and_the_run_starts() -> None:
    run, plan = first_pass()
    world = admitted_world(run, plan)
    plan = decide(world, SETTINGS)
    assert [e[1] for e in plan.events] == ["Admitted"]
    assert "JobSet r-fre-g0 (queue team-a)" in plan.events[0][2]
    assert conditions(plan)["Admitted"] == "True"
    assert plan.status["phase"] == "Pending"  # no trainer pod runs yet
    assert not [k for k in kinds(plan.ensure) if k.startswith("JobSet/")]  # it exists
    # decide() runs every few seconds: no second Event.
    run = with_status(run, plan)
    plan = decide(replace(world, run=run, trainer_pods=[trainer_pod()]), SETTINGS)
    assert not plan.events and plan.status["phase"] == "Running"
    assert conditions(plan)["Running"] == "True"


def test_admitted_but_still_suspended_is_queued() -> None:
    run, plan = first_pass()
    js = as_stored(plan, True)
    plan = decide(seen(run, jobset=js, workload=workload(js, RESERVED, ADMITTED)), SETTINGS)
    assert plan.status["phase"] == "Queued" and not plan.events


def test_an_eviction_requeues_the_same_jobset_uncounted_then_it_is_admitted_again() -> None:
    run, first = first_pass()
    world = admitted_world(run, first, trainer_pods=[trainer_pod()])
    plan = decide(world, SETTINGS)
    run = with_status(run, plan)
    assert plan.status["phase"] == "Running"
    # Kueue preempts: the Workload says Evicted; Kueue suspends the JobSet and its pods end
    # (SIGTERM, no DisruptionTarget): none of that is a failure.
    js = as_stored(first, True)
    evicted = workload(js, RESERVED, ADMITTED, EVICTED_BY_PREEMPTION, PREEMPTED)
    stopped = [trainer_pod("Failed", exit_code=SIGTERMED)]
    plan = decide(
        replace(world, run=run, jobset=js, workload=evicted, trainer_pods=stopped), SETTINGS
    )
    assert plan.status["phase"] == "Queued"
    assert [e[:2] for e in plan.events] == [("Warning", "Preempted")]
    assert "InClusterQueue" in plan.events[0][2] and "not counted" in plan.events[0][2]
    assert (plan.status["restarts"], plan.status.get("disruptions") or 0) == (0, 0)
    assert plan.status["stages"][0]["restarts"] == 0 and not plan.delete_stage
    assert plan.status.get("retryAfter") is None
    admitted = condition_of(plan, "Admitted")
    assert (admitted["status"], admitted["reason"]) == ("False", "Preempted")
    # Still evicted on the next pass: no second Event.
    run = with_status(run, plan)
    again = decide(
        replace(world, run=run, jobset=js, workload=evicted, trainer_pods=stopped), SETTINGS
    )
    assert not again.events
    # Requeued (Evicted False, waiting for quota) with the pods gone: still Queued, silent.
    requeued = workload(js, REQUEUED)
    run = with_status(run, again)
    plan = decide(replace(world, run=run, jobset=js, workload=requeued), SETTINGS)
    assert plan.status["phase"] == "Queued" and not plan.events
    # Re-admitted: Kueue unsuspends the same JobSet (the same attempt, the same name).
    run = with_status(run, plan)
    plan = decide(replace(world, run=run, trainer_pods=[trainer_pod()]), SETTINGS)
    assert [e[1] for e in plan.events] == ["Admitted"]
    assert plan.status["phase"] == "Running"
    assert plan.status["stages"][0].get("restarts", 0) == 0


def test_an_eviction_seen_only_as_a_requeue_is_reported() -> None:
    run, first = first_pass()
    world = admitted_world(run, first)
    run = with_status(run, decide(world, SETTINGS))
    js = as_stored(first, True)
    plan = decide(replace(world, run=run, jobset=js, workload=workload(js, REQUEUED)), SETTINGS)
    assert [e[:2] for e in plan.events] == [("Warning", "Requeued")]
    assert plan.status["phase"] == "Queued" and plan.status["restarts"] == 0


def test_a_failed_jobset_is_a_counted_restart_under_a_new_attempt() -> None:
    run, plan = first_pass()
    world = admitted_world(run, plan)
    run = with_status(run, decide(world, SETTINGS))
    why = "jobset failed due to one or more job failures (first failed job: r-fre-g0-trainer-0)"
    js = as_stored(plan, False, jobset_condition("Failed", why, "FailedJobs"))
    crashed = [trainer_pod("Failed", exit_code=1)]
    plan = decide(replace(world, run=run, jobset=js, trainer_pods=crashed), SETTINGS)
    assert plan.status["restarts"] == 1 and plan.delete_stage
    assert [e[1] for e in plan.events] == ["StageRestarting"]
    assert why in plan.events[0][2] and "trainer exit 1" in plan.events[0][2]
    # After the back-off the next attempt is a new JobSet (its name carries the attempt).
    run = with_status(run, plan)
    later = decide(seen(run, now=at(60)), SETTINGS)
    assert f"JobSet/{naming.jobset('r', 'fre', 1)}" in kinds(later.ensure)
    assert later.status["phase"] == "Queued"


def test_a_jobset_failed_by_a_disruption_is_not_counted() -> None:
    run, plan = first_pass()
    world = admitted_world(run, plan)
    run = with_status(run, decide(world, SETTINGS))
    js = as_stored(plan, False, jobset_condition("Failed", "jobset failed", "FailedJobs"))
    message = (
        f"Pod ns/{JOBSET}-trainer-0-0-x1 has condition DisruptionTarget matching FailJob "
        "rule at index 0"
    )
    child = {
        "metadata": {
            "name": f"{JOBSET}-trainer-0",
            "uid": "job-uid",
            "ownerReferences": [{"kind": "JobSet", "uid": JOBSET_UID, "controller": True}],
        },
        "status": {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "PodFailurePolicy",
                    "message": message,
                }
            ]
        },
    }
    plan = decide(replace(world, run=run, jobset=js, jobset_jobs=[child]), SETTINGS)
    assert (plan.status["restarts"], plan.status["disruptions"]) == (0, 1)
    assert [e[1] for e in plan.events] == ["Disrupted"] and message in plan.events[0][2]
    assert plan.delete_stage


def test_a_completed_jobset_completes_the_stage_through_the_final_checkpoint_check() -> None:
    run, plan = first_pass()
    world = admitted_world(run, plan)
    run = with_status(run, decide(world, SETTINGS))
    js = as_stored(plan, False, jobset_condition("Completed", "jobset completed successfully"))
    final = "s3://bucket/ckpt/ns/r/uid-1/fre/step-40"
    done = replace(world, run=run, jobset=js, progress=finished_report(final))
    plan = decide(done, SETTINGS)
    assert plan.check_final_checkpoint == final and plan.status["stageIndex"] == 0
    plan = decide(replace(done, final_checkpoint_committed=True), SETTINGS)
    assert plan.status["stages"][0]["phase"] == "Succeeded" and plan.delete_stage
    assert plan.status["stages"][0]["finalCheckpoint"] == final


def test_a_missing_jobset_crd_is_a_condition_and_one_event_naming_what_to_install() -> None:
    run, plan = first_pass()
    refused = CreateFailure(
        "JobSet", JOBSET, "NotFound", "the server does not serve jobset.x-k8s.io/v1alpha2 JobSet"
    )
    world = seen(run, create_failures=[refused])
    plan = decide(world, SETTINGS)
    blocked = condition_of(plan, "Blocked")
    assert (blocked["status"], blocked["reason"]) == ("True", "JobSetNotInstalled")
    assert "JobSet v0.11.1+" in blocked["message"] and "Kueue v0.17.0+" in blocked["message"]
    assert [e[:2] for e in plan.events] == [("Warning", "JobSetNotInstalled")]
    assert condition_of(plan, "Admitted")["reason"] == "JobSetNotInstalled"
    assert f"JobSet/{JOBSET}" in kinds(plan.ensure)  # tried again on every pass
    again = decide(replace(world, run=with_status(run, plan)), SETTINGS)
    assert not again.events


def test_suspend_deletes_the_jobset_and_resume_queues_a_new_one() -> None:
    run, plan = first_pass()
    world = admitted_world(run, plan)
    run = with_status(run, decide(world, SETTINGS))
    run["spec"] = {**run["spec"], "suspend": True}
    plan = decide(replace(world, run=run, now=at(60)), SETTINGS)
    assert plan.status["phase"] == "Suspended" and plan.delete_stage
    assert condition_of(plan, "Admitted")["reason"] == "Suspended"
    run = with_status(run, plan)
    run["spec"] = {**run["spec"], "suspend": False}
    plan = decide(seen(run, now=at(600)), SETTINGS)  # the JobSet is gone
    assert f"JobSet/{JOBSET}" in kinds(plan.ensure)  # the same attempt: nothing counted
    assert plan.status["phase"] == "Queued" and plan.status["restarts"] == 0
    assert [e[1] for e in plan.events] == ["Resumed"]


def test_time_in_the_queue_does_not_count_toward_the_active_deadline() -> None:
    hour = 3600
    run, plan = first_pass(queued_run(activeDeadlineSeconds=hour))
    assert run["status"]["suspendedSince"] == "2026-01-01T12:00:00Z"
    js = as_stored(plan)
    waiting = seen(run, now=at(2 * hour), jobset=js, workload=workload(js, REQUEUED))
    still = decide(waiting, SETTINGS)
    assert still.status["phase"] == "Queued" and still.recheck_after is None
    run = with_status(run, still)
    world = replace(admitted_world(run, plan), now=at(2 * hour), trainer_pods=[trainer_pod()])
    plan = decide(world, SETTINGS)
    assert plan.status["phase"] == "Running" and plan.status["suspendedSeconds"] == 2 * hour
    run = with_status(run, plan)
    assert decide(replace(world, run=run, now=at(3 * hour)), SETTINGS).status["phase"] == (
        "Running"
    )
    failed = decide(replace(world, run=run, now=at(3 * hour + 1)), SETTINGS)
    assert failed.status["phase"] == "Failed"
    assert "7200s suspended or queued not counted" in condition_of(failed, "Failed")["message"]


# -- the controller -----------------------------------------------------------------------


def queued_controller() -> tuple[Any, FakeKube, list[tuple[str, str, str]]]:
    run = controller_run("separate")
    run["spec"]["queueName"] = QUEUE
    ctl, kube, posted = controller(run)
    kube.objects[("Secret", "s3-creds")] = {"metadata": {"name": "s3-creds"}}
    return ctl, kube, posted


def test_the_controller_creates_the_jobset_and_reads_its_workload_jobs_and_pods() -> None:
    ctl, kube, _ = queued_controller()
    ctl.reconcile("ns", "r")
    assert (jobset.KIND, JOBSET) in kube.objects
    assert not [key for key in kube.objects if key[0] in ("Job", "Pod")]
    js = kube.objects[(jobset.KIND, JOBSET)]
    uid = js["metadata"]["uid"]
    js["spec"]["suspend"] = False  # Kueue admitted it
    kube.objects[("Workload", "wl")] = workload_of(js, RESERVED, ADMITTED)
    # JobSet's Jobs (owned by it, with the template's labels) and the Job controller's pods.
    for rjob in js["spec"]["replicatedJobs"]:
        name = f"{JOBSET}-{rjob['name']}-0"
        kube.objects[("Job", name)] = {
            "metadata": {
                "name": name,
                "uid": f"uid-{name}",
                "labels": rjob["template"]["metadata"]["labels"],
                "ownerReferences": [{"kind": "JobSet", "uid": uid, "controller": True}],
            },
            "spec": {"parallelism": 1},
        }
        kube.objects[("Pod", f"{name}-0-x")] = {
            "metadata": {
                "name": f"{name}-0-x",
                "labels": {**rjob["template"]["metadata"]["labels"], "job-name": name},
                "ownerReferences": [{"kind": "Job", "uid": f"uid-{name}", "controller": True}],
            },
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        }
    seen_, stale = ctl.observe(kube.objects[("LMMR1Run", "r")])
    assert seen_.jobset is not None and seen_.workload is not None and stale == []
    assert seen_.job is None and len(seen_.jobset_jobs) == 2
    assert [p["metadata"]["name"] for p in seen_.trainer_pods] == [f"{JOBSET}-trainer-0-0-x"]
    assert [p["metadata"]["name"] for p in seen_.rollout_pods] == [f"{JOBSET}-rollout-0-0-x"]
    assert seen_.create_failures == []  # the JobSet's children are not "names taken"
    ctl.reconcile("ns", "r")
    status = kube.objects[("LMMR1Run", "r")]["status"]
    assert status["phase"] == "Running" and condition(kube, "Admitted")["status"] == "True"
    # Suspending deletes the JobSet (which takes its Jobs and pods with it).
    kube.objects[("LMMR1Run", "r")]["spec"]["suspend"] = True
    ctl.reconcile("ns", "r")
    assert (jobset.KIND, JOBSET) not in kube.objects


class NoJobSetKube(FakeKube):
    """A cluster without the JobSet CRD: creating one is refused as Kube refuses it."""

    def ensure(self, obj: Obj) -> bool:
        if obj["kind"] == jobset.KIND:
            raise CreateRefused(
                obj["kind"], obj["metadata"]["name"], "NotFound", "the server does not serve it"
            )
        return super().ensure(obj)


def test_the_controller_shows_a_missing_jobset_crd_on_the_run() -> None:
    ctl, kube, posted = queued_controller()
    fake = NoJobSetKube(kube.objects[("LMMR1Run", "r")])
    fake.objects = kube.objects
    ctl.kube = fake  # type: ignore[assignment]
    ctl.reconcile("ns", "r")
    blocked = condition(fake, "Blocked")
    assert (blocked["status"], blocked["reason"]) == ("True", "JobSetNotInstalled")
    assert [p[1] for p in posted].count("JobSetNotInstalled") == 1
    ctl.reconcile("ns", "r")
    assert [p[1] for p in posted].count("JobSetNotInstalled") == 1


class Discovery:
    """The dynamic client's discovery in a cluster that serves no JobSet or Workload."""

    def __init__(self) -> None:
        self.lookups = 0

    def get(self, api_version: str, kind: str) -> Any:
        self.lookups += 1
        raise ResourceNotFoundError(f"No matches found for {{'kind': '{kind}'}}")


def test_kube_reads_an_unserved_optional_kind_as_none_and_refuses_its_create(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    discovery = Discovery()

    class Dynamic:
        def __init__(self, api_client: Any) -> None:
            self.resources = discovery

    monkeypatch.setattr(kube_module.dynamic, "DynamicClient", Dynamic)
    kube = Kube(None)  # type: ignore[arg-type]
    assert kube.get("JobSet", "ns", JOBSET) is None
    assert kube.list("Workload", "ns", {kueue.JOB_UID_LABEL: "x"}) == []
    kube.delete("JobSet", "ns", JOBSET)
    _, plan = first_pass()
    (built,) = [o for o in plan.ensure if o["kind"] == jobset.KIND]
    with pytest.raises(CreateRefused) as refused:
        kube.ensure(built)
    assert (refused.value.kind, refused.value.reason) == ("JobSet", "NotFound")
    # Discovery is asked once a minute at most, not on every pass.
    assert discovery.lookups == 2  # one per kind
    with pytest.raises(ResourceNotFoundError):
        kube.get("Pod", "ns", "p")  # a kind the operator always needs stays an error


class RemovedCrdDiscovery:
    """Discovery that still lists JobSet (read before its CRD was deleted) until its cache
    is invalidated; the API server then answers a create as it does for an unknown path."""

    def __init__(self) -> None:
        self.served = True

    def invalidate_cache(self) -> None:
        self.served = False

    def get(self, api_version: str, kind: str) -> Any:
        if not self.served:
            raise ResourceNotFoundError(f"No matches found for {{'kind': '{kind}'}}")
        return RemovedCrdResource()


class RemovedCrdResource:
    def create(self, body: Any, namespace: str) -> Any:
        # What the test bed's API server answered once the JobSet CRD was deleted.
        raise NotFoundError(ApiException(status=404, reason="Not Found"))


def test_a_jobset_crd_removed_after_discovery_is_not_installed_not_a_create_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    discovery = RemovedCrdDiscovery()

    class Dynamic:
        def __init__(self, api_client: Any) -> None:
            self.resources = discovery

    monkeypatch.setattr(kube_module.dynamic, "DynamicClient", Dynamic)
    _, plan = first_pass()
    (built,) = [o for o in plan.ensure if o["kind"] == jobset.KIND]
    with pytest.raises(CreateRefused) as refused:
        Kube(None).ensure(built)  # type: ignore[arg-type]
    # Without asking discovery again this was a bare 404, shown as CreateFailed.
    assert (refused.value.kind, refused.value.reason) == ("JobSet", "NotFound")
    assert not discovery.served


def test_a_jobset_the_api_server_refuses_is_shown_not_left_queued() -> None:
    run, _ = first_pass()
    why = 'admission webhook "vjobset.kb.io" denied the request: spec.network.subdomain: ...'
    world = seen(run, create_failures=[CreateFailure("JobSet", JOBSET, "Invalid", why)])
    plan = decide(world, SETTINGS)
    blocked = condition_of(plan, "Blocked")
    assert (blocked["status"], blocked["reason"]) == ("True", "CreateFailed")
    assert why in blocked["message"] and plan.status["phase"] == "Queued"
    assert [e[:2] for e in plan.events] == [("Warning", "CreateFailed")]
    assert not decide(replace(world, run=with_status(run, plan)), SETTINGS).events


def test_the_stall_clock_starts_once_the_rollout_servers_the_trainer_waits_for_are_ready() -> None:
    """On the JobSet path the trainer runs beside rollout servers still loading their model
    (or pulling their image): waiting for them is not a stall. Once they are Ready the
    watchdog works as on the Job path."""
    run, plan = first_pass()
    replicas = stage_context(run).stage.resources.rollout.replicas
    loading = [pod(f"{JOBSET}-rollout-0-{i}-x", ready=False) for i in range(replicas)]
    ready = [pod(f"{JOBSET}-rollout-0-{i}-x") for i in range(replicas)]
    hours = 0.0
    for rollouts in (loading, loading, ready, ready):
        world = admitted_world(run, plan, trainer_pods=[trainer_pod()], rollout_pods=rollouts)
        step = decide(replace(world, now=at(hours * 3600)), SETTINGS)
        run, hours = with_status(run, step), hours + 2
        stalled = [e for e in step.events if e[1] == "Stalled"]
        if rollouts is loading:
            assert not stalled and step.status.get("lastProgressTime") is None, step.events
    # Two hours after the servers were Ready with no progress since: Stalled.
    assert stalled, step.events
