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
    'pods "r-fre-rollout-0" is forbidden: violates PodSecurity "restricted:latest": '
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
    ) -> None:
        run = self.objects[("LMMR1Run", name)]
        run["status"] = {k: v for k, v in status.items() if v is not None}
        self.version += 1
        run["metadata"]["resourceVersion"] = str(self.version)

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
    assert created["message"] == f"Pod r-fre-rollout-0: {FORBIDDEN}"
    assert ("Warning", "CreateFailed", f"Pod r-fre-rollout-0: {FORBIDDEN}") in posted
    assert ("ConfigMap", "r-fre-config") in kube.objects  # the other children were created
    ctl.reconcile("ns", "r")
    assert [p[1] for p in posted].count("CreateFailed") == 1
    # The namespace's policy is fixed: the pod is created and the condition turns True.
    del kube.refuse["Pod"]
    ctl.reconcile("ns", "r")
    assert ("Pod", "r-fre-rollout-0") in kube.objects
    assert condition(kube, "ChildrenCreated")["status"] == "True"


def test_a_job_whose_pods_are_refused_shows_its_failed_create_events() -> None:
    ctl, kube, posted = controller(new_run())
    kube.objects[("Secret", "s3-creds")] = {"metadata": {"name": "s3-creds"}}
    # Colocated rollouts (one trainer node): the trainer Job comes on the first pass.
    ctl.reconcile("ns", "r")
    assert not [key for key in kube.objects if key[0] == "Pod"]
    job = kube.objects[("Job", naming.trainer_job("r", "fre"))]
    assert job["metadata"]["uid"] == "uid-r-fre-trainer"
    # The Job controller's pod creation is refused: an Event on the Job, no pods.
    message = 'Error creating: pods "r-fre-trainer-0-abcde" is forbidden: violates PodSecurity'
    kube.events_by_uid["uid-r-fre-trainer"] = [
        {"reason": "FailedCreate", "message": message, "lastTimestamp": "2026-01-01T00:00:00Z"}
    ]
    ctl.reconcile("ns", "r")
    created = condition(kube, "ChildrenCreated")
    assert created["status"] == "False"
    assert created["message"] == f"Job r-fre-trainer: {message}"
    assert ("Warning", "CreateFailed", f"Job r-fre-trainer: {message}") in posted
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
    job = kube.objects[("Job", "r-fre-trainer")]
    assert ("NetworkPolicy", "r-fre-trainer") in kube.objects
    kube.objects[("Pod", "r-fre-trainer-0")] = {
        "kind": "Pod",
        "metadata": {
            "name": "r-fre-trainer-0",
            "labels": {**job["metadata"]["labels"], "job-name": "r-fre-trainer"},
            "ownerReferences": [{"uid": job["metadata"]["uid"]}],
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
    for child in (("Job", "r-fre-trainer"), ("NetworkPolicy", "r-fre-trainer")):
        assert child not in kube.objects, child
    assert ctl.metrics.registry.get_sample_value("lmmr1_stage_restarts_total") == 1


def test_a_disrupted_pod_starts_a_new_attempt_counted_apart_from_restarts() -> None:
    """A rollout server evicted (terminating, DisruptionTarget): the stage's children go,
    the Event says Disrupted, lmmr1_stage_disruptions_total counts it (the restarts'
    counter does not), and the stage comes back under attempt 1, so the evicted pod still
    terminating is stale, not a second disruption."""
    ctl, kube, posted = controller(new_run("separate"))
    kube.objects[("Secret", "s3-creds")] = {"metadata": {"name": "s3-creds"}}
    ctl.reconcile("ns", "r")
    server = kube.objects[("Pod", "r-fre-rollout-0")]
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
    assert ("Pod", "r-fre-rollout-0") not in kube.objects
    # The evicted pod is still terminating when the back-off is over.
    kube.objects[("Pod", "r-fre-rollout-0")] = evicted
    status["retryAfter"] = None
    ctl.reconcile("ns", "r")
    status = kube.objects[("LMMR1Run", "r")]["status"]
    assert status["disruptions"] == 1 and status["phase"] != "Failed"
    # Deleted as stale, and (this API server deletes at once) created afresh.
    fresh = kube.objects[("Pod", "r-fre-rollout-0")]["metadata"]
    assert fresh["labels"]["lmmr1.io/attempt"] == "1" and "deletionTimestamp" not in fresh
    ctl.reconcile("ns", "r")
    assert kube.objects[("LMMR1Run", "r")]["status"]["disruptions"] == 1
