"""The controller's I/O around the pure decision, against an in-memory API server: what the
API server refuses to create, and pods a Job's controller cannot create, reach the run's
status and its Events."""

from __future__ import annotations

import copy
from typing import Any

from tests.invalid_runs import valid_run

from lmmr1_operator import naming
from lmmr1_operator.controller import Controller
from lmmr1_operator.kube import CreateRefused
from lmmr1_operator.metrics import Metrics
from lmmr1_operator.settings import OperatorSettings

Obj = dict[str, Any]
FORBIDDEN = (
    'pods "r-fre-r0-0" is forbidden: violates PodSecurity "restricted:latest": '
    'allowPrivilegeEscalation != false (container "rollout" must set '
    "securityContext.allowPrivilegeEscalation=false)"
)


class FakeKube:
    """Objects by (kind, name) in one namespace; `refuse` maps a kind to the API server's
    message for refusing to create it."""

    def __init__(self, run: Obj) -> None:
        self.objects: dict[tuple[str, str], Obj] = {("LMMR1Run", run["metadata"]["name"]): run}
        self.refuse: dict[str, str] = {}
        self.events_by_uid: dict[str, list[Obj]] = {}
        self.version = 1

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        found = self.objects.get((kind, name))
        return copy.deepcopy(found) if found is not None else None

    def list(self, kind: str, namespace: str, labels: dict[str, str]) -> list[Obj]:
        return [
            copy.deepcopy(o)
            for (k, _), o in self.objects.items()
            if k == kind and labels.items() <= (o["metadata"].get("labels") or {}).items()
        ]

    def ensure(self, obj: Obj) -> bool:
        key = (obj["kind"], obj["metadata"]["name"])
        if key in self.objects:
            return False
        if obj["kind"] in self.refuse:
            raise CreateRefused(obj["kind"], key[1], "Forbidden", self.refuse[obj["kind"]])
        self.objects[key] = {
            **copy.deepcopy(obj),
            "metadata": {**obj["metadata"], "uid": f"uid-{key[1]}"},
        }
        return True

    def replace(self, obj: Obj) -> None:
        if not self.ensure(obj):
            self.objects[(obj["kind"], obj["metadata"]["name"])]["data"] = obj.get("data")

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.objects.pop((kind, name), None)

    def delete_run(self, namespace: str, name: str) -> None:
        self.delete("LMMR1Run", namespace, name)

    def patch_status(
        self, namespace: str, name: str, status: Obj, resource_version: str | None = None
    ) -> str:
        run = self.objects[("LMMR1Run", name)]
        run["status"] = {k: v for k, v in status.items() if v is not None}
        self.version += 1
        run["metadata"]["resourceVersion"] = str(self.version)
        return str(self.version)

    def events(self, namespace: str, uid: str, reason: str) -> list[Obj]:
        return [e for e in self.events_by_uid.get(uid, []) if e["reason"] == reason]


def controller(run: Obj) -> tuple[Controller, FakeKube, list[tuple[str, str, str]]]:
    kube = FakeKube(run)
    posted: list[tuple[str, str, str]] = []
    ctl = Controller(
        kube,  # type: ignore[arg-type]
        OperatorSettings(),
        Metrics(),
        lambda run, kind, reason, message: posted.append((kind, reason, message)),
    )
    return ctl, kube, posted


def new_run(rollout_mode: str | None = None) -> Obj:
    run = valid_run("r")
    run["metadata"].update(namespace="ns", uid="uid-r", generation=1, resourceVersion="1")
    if rollout_mode is not None:
        for stage in run["spec"]["stages"]:
            stage["resources"] = {"rollout": {"mode": rollout_mode}}
    return run


def condition(kube: FakeKube, kind: str) -> Obj:
    status = kube.objects[("LMMR1Run", "r")]["status"]
    return dict(next(c for c in status["conditions"] if c["type"] == kind))


def test_a_pod_the_api_server_refuses_is_on_the_run_at_once_with_one_event() -> None:
    ctl, kube, posted = controller(new_run("separate"))
    kube.objects[("Secret", "s3-creds")] = {"metadata": {"name": "s3-creds"}}
    kube.refuse["Pod"] = FORBIDDEN
    ctl.reconcile("ns", "r")
    created = condition(kube, "ChildrenCreated")
    assert (created["status"], created["reason"]) == ("False", "CreateFailed")
    assert created["message"] == f"Pod r-fre-r0-0: {FORBIDDEN}"
    assert ("Warning", "CreateFailed", f"Pod r-fre-r0-0: {FORBIDDEN}") in posted
    assert ("ConfigMap", "r-fre-config") in kube.objects  # the other children were created
    ctl.reconcile("ns", "r")
    assert [p[1] for p in posted].count("CreateFailed") == 1
    # The namespace's policy is fixed: the pod is created and the condition turns True.
    del kube.refuse["Pod"]
    ctl.reconcile("ns", "r")
    assert ("Pod", "r-fre-r0-0") in kube.objects
    assert condition(kube, "ChildrenCreated")["status"] == "True"


def test_a_job_whose_pods_are_refused_shows_its_failed_create_events() -> None:
    ctl, kube, posted = controller(new_run())
    kube.objects[("Secret", "s3-creds")] = {"metadata": {"name": "s3-creds"}}
    # Colocated rollouts (one trainer node): the trainer Job comes on the first pass.
    ctl.reconcile("ns", "r")
    assert not [key for key in kube.objects if key[0] == "Pod"]
    job = kube.objects[("Job", naming.trainer_job("r", "fre", 0))]
    assert job["metadata"]["uid"] == "uid-r-fre-t0"
    # The Job controller's pod creation is refused: an Event on the Job, no pods.
    message = 'Error creating: pods "r-fre-t0-0-abcde" is forbidden: violates PodSecurity'
    kube.events_by_uid["uid-r-fre-t0"] = [
        {"reason": "FailedCreate", "message": message, "lastTimestamp": "2026-01-01T00:00:00Z"}
    ]
    ctl.reconcile("ns", "r")
    created = condition(kube, "ChildrenCreated")
    assert created["status"] == "False"
    assert created["message"] == f"Job r-fre-t0: {message}"
    assert ("Warning", "CreateFailed", f"Job r-fre-t0: {message}") in posted
    assert condition(kube, "Blocked")["reason"] == "CreateFailed"


def test_metrics_serve_twice_on_one_port_is_harmless() -> None:
    """kopf retries a failed `configure`; the second call must not fail on the bound port."""
    import socket

    from lmmr1_operator.metrics import Metrics

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics = Metrics()
    metrics.serve("127.0.0.1", port)
    metrics.serve("127.0.0.1", port)


def test_a_stalled_trainer_is_torn_down_with_its_network_policy_and_counted() -> None:
    """A pass with no cluster event (the resync loop's) past the stall timeout: the stage's
    children go, its NetworkPolicy included, the Warning Event says Stalled, and the restart
    counts in lmmr1_stage_restarts_total."""
    run = new_run()
    run["spec"]["stallTimeoutSeconds"] = 60
    ctl, kube, posted = controller(run)
    kube.objects[("Secret", "s3-creds")] = {"metadata": {"name": "s3-creds"}}
    ctl.reconcile("ns", "r")
    job = kube.objects[("Job", "r-fre-t0")]
    assert ("NetworkPolicy", "r-fre-trainer") in kube.objects
    kube.objects[("Pod", "r-fre-t0-0")] = {
        "kind": "Pod",
        "metadata": {
            "name": "r-fre-t0-0",
            "labels": {**job["metadata"]["labels"], "job-name": "r-fre-t0"},
            "ownerReferences": [{"uid": job["metadata"]["uid"], "controller": True}],
        },
        "status": {"phase": "Running"},
    }
    ctl.reconcile("ns", "r")
    status = kube.objects[("LMMR1Run", "r")]["status"]
    assert status["lastProgressTime"]  # the trainer runs: the clock started
    status["lastProgressTime"] = "2026-01-01T00:00:00Z"  # long ago
    ctl.reconcile("ns", "r")
    assert [reason for _, reason, _ in posted][-1] == "Stalled"
    assert kube.objects[("LMMR1Run", "r")]["status"]["restarts"] == 1
    for child in (("Job", "r-fre-t0"), ("NetworkPolicy", "r-fre-trainer")):
        assert child not in kube.objects, child
    assert ctl.metrics.registry.get_sample_value("lmmr1_stage_restarts_total") == 1


def test_a_run_created_again_under_its_old_name_adopts_none_of_the_old_runs_children() -> None:
    """The old run's Job and progress report (a final checkpoint!) wait for the garbage
    collector, or were orphaned: the new run (another UID) reads neither, says which names
    are taken, and creates its own children once they are gone."""
    old = new_run()
    old["metadata"]["uid"] = "uid-old"
    ctl_old, kube, _ = controller(old)
    kube.objects[("Secret", "s3-creds")] = {"metadata": {"name": "s3-creds"}}
    ctl_old.reconcile("ns", "r")
    old_job = kube.objects[("Job", "r-fre-t0")]
    assert old_job["metadata"]["ownerReferences"][0]["uid"] == "uid-old"
    report = '{"stage": "fre", "step": 40, "total_steps": 40, "final_checkpoint": ' + (
        '"s3://bucket/ckpt/ns/r/uid-old/fre/step-40", "updated_at": "2026-01-01T12:00:00Z"}'
    )
    progress = kube.objects[("ConfigMap", naming.progress_configmap("r"))]
    progress["data"] = {"progress.json": report}
    # The run is deleted and created again: same name, new UID, the children still there.
    again = new_run()
    kube.objects[("LMMR1Run", "r")] = again
    ctl = Controller(kube, OperatorSettings(), Metrics(), lambda *_: None)  # type: ignore[arg-type]
    seen, stale = ctl.observe(again)
    assert seen.job is None and seen.progress is None and seen.config is None and not stale
    ctl.reconcile("ns", "r")
    status = kube.objects[("LMMR1Run", "r")]["status"]
    assert not status.get("step") and status["stages"][0]["phase"] != "Succeeded"
    created = condition(kube, "ChildrenCreated")
    assert created["reason"] == "CreateFailed" and "NameTaken" not in created["message"]
    assert "Job r-fre-t0: r-fre-t0 already exists and is not this run's" in (created["message"])
    assert "uid uid-old" in created["message"]
    assert kube.objects[("Job", "r-fre-t0")] is old_job  # neither adopted nor deleted
    # The garbage collector removes the old run's children: the new run creates its own.
    for key in [
        k for k, o in kube.objects.items() if k[0] != "LMMR1Run" and _owner(o) == "uid-old"
    ]:
        del kube.objects[key]
    ctl.reconcile("ns", "r")
    assert _owner(kube.objects[("Job", "r-fre-t0")]) == "uid-r"
    assert condition(kube, "ChildrenCreated")["status"] == "True"


def _owner(obj: Obj) -> str | None:
    refs = obj["metadata"].get("ownerReferences") or []
    return refs[0]["uid"] if refs else None


def test_an_exception_while_acting_is_counted_and_shown_on_the_run_by_the_next_pass() -> None:
    ctl, kube, posted = controller(new_run())
    kube.objects[("Secret", "s3-creds")] = {"metadata": {"name": "s3-creds"}}
    broken = kube.ensure

    def ensure(obj: Obj) -> bool:
        if obj["kind"] == "Job":
            raise RuntimeError("connection reset by peer")
        return broken(obj)

    kube.ensure = ensure  # type: ignore[method-assign]
    try:
        ctl.reconcile("ns", "r")
    except RuntimeError:
        pass
    else:
        raise AssertionError("the pass's error was swallowed")
    assert (
        ctl.metrics.registry.get_sample_value(
            "lmmr1_reconcile_errors_total", {"error": "RuntimeError"}
        )
        == 1
    )
    kube.ensure = broken  # type: ignore[method-assign]
    ctl.reconcile("ns", "r")
    shown = condition(kube, "Reconciled")
    assert (shown["status"], shown["reason"]) == ("False", "ReconcileError")
    assert "RuntimeError: connection reset by peer" in shown["message"]
    assert [p[1] for p in posted].count("ReconcileError") == 1
    ctl.reconcile("ns", "r")
    assert condition(kube, "Reconciled")["status"] == "True"
    assert ("Job", "r-fre-t0") in kube.objects


def test_the_watch_event_of_the_operators_own_status_write_is_recognised() -> None:
    ctl, kube, _ = controller(new_run())
    kube.objects[("Secret", "s3-creds")] = {"metadata": {"name": "s3-creds"}}
    ctl.reconcile("ns", "r")
    written = kube.objects[("LMMR1Run", "r")]["metadata"]["resourceVersion"]
    assert ctl.wrote("ns", "r", written)
    # Anyone else's change (a user's edit, a later version) is not the operator's write.
    assert not ctl.wrote("ns", "r", str(int(written) + 1))
    assert not ctl.wrote("ns", "other", written) and not ctl.wrote("ns", "r", None)


def test_a_disrupted_pod_starts_a_new_attempt_counted_apart_from_restarts() -> None:
    """A rollout server evicted (terminating, DisruptionTarget): the stage's children go,
    the Event says Disrupted, lmmr1_stage_disruptions_total counts it (the restarts'
    counter does not), and the stage comes back under attempt 1, so the evicted pod still
    terminating is stale, not a second disruption."""
    ctl, kube, posted = controller(new_run("separate"))
    kube.objects[("Secret", "s3-creds")] = {"metadata": {"name": "s3-creds"}}
    ctl.reconcile("ns", "r")
    server = kube.objects[("Pod", "r-fre-r0-0")]
    server["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    server["status"] = {
        "phase": "Running",
        "conditions": [
            {
                "type": "DisruptionTarget",
                "status": "True",
                "reason": "EvictionByEvictionAPI",
                "message": "Eviction API: evicting",
            }
        ],
    }
    evicted = copy.deepcopy(server)
    ctl.reconcile("ns", "r")
    status = kube.objects[("LMMR1Run", "r")]["status"]
    assert (status["restarts"], status.get("disruptions")) == (0, 1)
    assert [reason for _, reason, _ in posted][-1] == "Disrupted"
    assert ctl.metrics.registry.get_sample_value("lmmr1_stage_disruptions_total") == 1
    assert ctl.metrics.registry.get_sample_value("lmmr1_stage_restarts_total") == 0
    assert ("Pod", "r-fre-r0-0") not in kube.objects
    # The evicted pod is still terminating when the back-off is over.
    kube.objects[("Pod", "r-fre-r0-0")] = evicted
    status["retryAfter"] = None
    ctl.reconcile("ns", "r")
    status = kube.objects[("LMMR1Run", "r")]["status"]
    assert status["disruptions"] == 1 and status["phase"] != "Failed"
    # Deleted as stale; the new attempt's pod, of another name, created in the same pass.
    assert ("Pod", "r-fre-r0-0") not in kube.objects
    fresh = kube.objects[("Pod", "r-fre-r1-0")]["metadata"]
    assert fresh["labels"]["lmmr1.io/attempt"] == "1" and "deletionTimestamp" not in fresh
    ctl.reconcile("ns", "r")
    assert kube.objects[("LMMR1Run", "r")]["status"]["disruptions"] == 1


def _restarted_once(kube: FakeKube) -> None:
    """The run's status after one failed attempt, its back-off over: attempt 1 is due."""
    status = kube.objects[("LMMR1Run", "r")]["status"]
    status["restarts"] = status["stages"][0]["restarts"] = 1
    status["retryAfter"] = None


def test_a_restart_starts_the_new_attempts_job_while_the_old_one_still_terminates() -> None:
    """The old attempt's Job (being deleted) has a name of its own: the new attempt's Job is
    created at once, not once the old one is gone, and the old one is not read as the new."""
    ctl, kube, _ = controller(new_run())
    kube.objects[("Secret", "s3-creds")] = {"metadata": {"name": "s3-creds"}}
    ctl.reconcile("ns", "r")
    old = kube.objects[("Job", "r-fre-t0")]
    old["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    old["status"] = {"conditions": [{"type": "Failed", "status": "True"}]}
    _restarted_once(kube)
    ctl.reconcile("ns", "r")
    new = kube.objects[("Job", "r-fre-t1")]
    assert new["metadata"]["labels"]["lmmr1.io/attempt"] == "1"
    assert new["spec"]["template"]["spec"]["subdomain"] == "r-fre-trainer"
    status = kube.objects[("LMMR1Run", "r")]["status"]
    assert status["restarts"] == 1 and status["phase"] != "Failed"


def test_an_older_attempts_job_is_deleted_and_never_taken_for_the_current_one() -> None:
    """A Job of attempt 0 left behind (an operator that died before deleting it) is stale:
    deleted, and its Complete condition does not finish the stage of attempt 1, nor does
    its Failed condition restart it."""
    for ended in ("Complete", "Failed"):
        ctl, kube, posted = controller(new_run())
        kube.objects[("Secret", "s3-creds")] = {"metadata": {"name": "s3-creds"}}
        ctl.reconcile("ns", "r")
        old = kube.objects[("Job", "r-fre-t0")]
        old["status"] = {"conditions": [{"type": ended, "status": "True"}]}
        _restarted_once(kube)
        seen, stale = ctl.observe(kube.objects[("LMMR1Run", "r")])
        assert seen.job is None and ("Job", "r-fre-t0") in stale
        ctl.reconcile("ns", "r")
        assert ("Job", "r-fre-t0") not in kube.objects
        assert kube.objects[("Job", "r-fre-t1")]["metadata"]["labels"]["lmmr1.io/attempt"] == "1"
        status = kube.objects[("LMMR1Run", "r")]["status"]
        assert status["restarts"] == 1 and status["stages"][0]["phase"] == "Running", ended
        assert status["phase"] not in ("Succeeded", "Failed") and not posted[2:], posted
        seen, stale = ctl.observe(kube.objects[("LMMR1Run", "r")])
        assert seen.job is not None and seen.job["metadata"]["name"] == "r-fre-t1"
        assert not stale


def test_an_attempts_children_named_otherwise_are_its_own_and_get_no_second_copy() -> None:
    """Children are matched by owner and attempt label, not by name: the current attempt's
    Job and rollout pod under other names (an operator that named them otherwise) are the
    attempt's, and no second Job or rollout pod is created beside them."""
    ctl, kube, _ = controller(new_run("separate"))
    kube.objects[("Secret", "s3-creds")] = {"metadata": {"name": "s3-creds"}}
    ctl.reconcile("ns", "r")
    server = kube.objects.pop(("Pod", "r-fre-r0-0"))
    server["metadata"]["name"] = "r-fre-rollout-0"
    server["status"] = {
        "phase": "Running",
        "podIP": "10.0.0.7",
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    kube.objects[("Pod", "r-fre-rollout-0")] = server
    ctl.reconcile("ns", "r")
    assert ("Pod", "r-fre-r0-0") not in kube.objects
    job = kube.objects.pop(("Job", "r-fre-t0"))
    job["metadata"]["name"] = "r-fre-trainer"
    kube.objects[("Job", "r-fre-trainer")] = job
    ctl.reconcile("ns", "r")
    seen, stale = ctl.observe(kube.objects[("LMMR1Run", "r")])
    assert seen.job is not None and seen.job["metadata"]["name"] == "r-fre-trainer"
    assert not stale and ("Job", "r-fre-t0") not in kube.objects


def test_a_trainer_service_selecting_one_jobs_pods_by_name_is_made_again() -> None:
    """Upgraded from an operator whose trainer Service selected `job-name` (one Job's
    pods): that selector misses a restarted attempt's Job, so the Service is deleted and
    created again with the stage's selector, which every attempt's ranks carry."""
    ctl, kube, _ = controller(new_run())
    kube.objects[("Secret", "s3-creds")] = {"metadata": {"name": "s3-creds"}}
    ctl.reconcile("ns", "r")
    service = kube.objects[("Service", "r-fre-trainer")]
    wanted = dict(service["spec"]["selector"])
    job = kube.objects[("Job", "r-fre-t0")]
    assert wanted.items() <= job["spec"]["template"]["metadata"]["labels"].items()
    service["spec"]["selector"] = {"job-name": "r-fre-trainer"}
    _, stale = ctl.observe(kube.objects[("LMMR1Run", "r")])
    assert stale == [("Service", "r-fre-trainer")]
    ctl.reconcile("ns", "r")
    ctl.reconcile("ns", "r")
    assert kube.objects[("Service", "r-fre-trainer")]["spec"]["selector"] == wanted
    assert ctl.observe(kube.objects[("LMMR1Run", "r")])[1] == []
