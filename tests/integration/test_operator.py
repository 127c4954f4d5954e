"""The operator on the test bed, installed by its own chart and running under that chart's
RBAC on the process node (two replicas: kopf peering lets one act). Runs land on the kwok
GPU nodes; each test plays the trainer's part: it reports progress into the run's progress
ConfigMap with the pods' own service account, commits checkpoints in the S3 server, and
ends pods with an exit code."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from tests.operator_bed import Bed, installed_operator

from lmmr1_operator import podstate
from lmmr1_operator.children import trainer
from lmmr1_testbed.faults import endpoint_that_hangs
from lmmr1_testbed.layout import TestBedState

pytestmark = pytest.mark.usefixtures("installed_manifests")


@pytest.fixture(scope="module")
def bed(testbed: TestBedState, s3_client: Any, installed_manifests: Any) -> Iterator[Bed]:
    with installed_operator(testbed, s3_client) as installed:
        yield installed


@pytest.fixture(autouse=True)
def _delete_runs_after_each_test(bed: Bed) -> Iterator[None]:
    yield
    bed.cleanup()


def test_two_stage_run_goes_fre_then_mgt_to_succeeded(bed: Bed) -> None:
    bed.apply_run("happy", rollout_mode="separate")
    trainer = bed.running_trainer("happy", "fre")
    rollouts = bed.pods("lmmr1.io/run=happy,lmmr1.io/role=rollout")
    assert len(rollouts) == 2 and all(
        p["spec"]["nodeName"].startswith("kwok-gpu") for p in rollouts
    )
    spec = trainer["spec"]
    assert spec["initContainers"][0]["name"] == "verifier"
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert bed.phase("happy", "Running")["stage"] == "fre"

    bed.report("happy", stage="fre", step=3, total_steps=8, reward=0.4, accuracy=0.2)
    bed.wait("progress in status", lambda: bed.status("happy").get("step") == 3, 10)
    row = bed.kubectl("get", "lmmr1runs", "happy", "--no-headers").stdout.split()
    assert row[1:6] == ["Running", "fre", "3", "37%", "0.4"]

    final_fre = bed.finish_stage("happy", "fre", steps=8)
    status = bed.wait(
        "stage mgt", lambda: (s := bed.status("happy")).get("stage") == "mgt" and s, 30
    )
    assert status["stages"][0]["finalCheckpoint"] == final_fre
    config = bed.wait(
        "stage mgt config",
        lambda: (
            bed.kubectl(
                "get",
                "configmap",
                "happy-mgt-config",
                "-o",
                "jsonpath={.data.rollout\\.yaml}",
                check=False,
            ).stdout
        ),
    )
    assert f"init_from: {final_fre}" in config  # stage 2 starts from stage 1's checkpoint
    assert not bed.pods("lmmr1.io/run=happy,lmmr1.io/stage=fre")  # stage 1 torn down

    final_mgt = bed.finish_stage("happy", "mgt")
    status = bed.phase("happy", "Succeeded")
    assert status["lastCheckpoint"] == final_mgt
    assert [s["phase"] for s in status["stages"]] == ["Succeeded", "Succeeded"]
    bed.wait("children removed", lambda: not bed.pods("lmmr1.io/run=happy"))
    events = bed.events("happy")
    for reason in ("Created", "StageStarted", "StageSucceeded", "Succeeded"):
        assert reason in events
    assert events.count("StageSucceeded") == 2  # one operator acted, not two


def test_a_run_in_a_second_served_namespace_is_reconciled(bed: Bed) -> None:
    """watchNamespaces lists two namespaces: the operator watches and resyncs runs in the
    one it does not live in, under the Role the chart gave it there."""
    other = Bed(bed.testbed, bed.second_ns, bed.bucket, bed.s3)
    try:
        other.apply_run("elsewhere", stages=1)
        other.finish_stage("elsewhere", "fre")
        status = other.phase("elsewhere", "Succeeded")
        assert [s["phase"] for s in status["stages"]] == ["Succeeded"]
    finally:
        other.cleanup()


def test_a_one_node_trainer_generates_itself_without_rollout_servers(bed: Bed) -> None:
    """rollout.mode unset and one trainer node: colocated vLLM, so no rollout pods, Service
    or NetworkPolicy, and the trainer starts at once with the whole stage config."""
    bed.apply_run("colocated", stages=1)
    bed.running_trainer("colocated", "fre")
    selector = "lmmr1.io/run=colocated,lmmr1.io/role=rollout"
    assert not bed.pods(selector)
    listed = bed.kubectl("get", "services,networkpolicies", "-l", selector, "-o", "name")
    assert not listed.stdout.strip(), listed.stdout
    # The trainer's own ranks are the only peers its NetworkPolicy admits.
    policies = bed.kubectl("get", "networkpolicies", "-l", "lmmr1.io/run=colocated", "-o", "name")
    assert policies.stdout.split() == ["networkpolicy.networking.k8s.io/colocated-fre-trainer"]
    config = bed.kubectl("get", "configmap", "colocated-fre-config", "-o", "json").stdout
    data = json.loads(config)["data"]
    assert set(data) == {"stage.yaml"}
    assert "mode: colocate" in data["stage.yaml"]
    assert bed.status("colocated")["stages"][0]["rolloutMode"] == "colocate"


def test_a_failed_trainer_resumes_then_the_run_fails_at_the_backoff_limit(bed: Bed) -> None:
    bed.apply_run("flaky", stages=1)
    first = bed.running_trainer("flaky", "fre")
    bed.exit(first, 1)
    bed.wait("restart 1", lambda: bed.status("flaky").get("restarts") == 1, 30)
    second = bed.running_trainer("flaky", "fre")
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    bed.exit(second, 1)
    bed.wait("restart 2", lambda: bed.status("flaky").get("restarts") == 2, 30)
    bed.exit(bed.running_trainer("flaky", "fre"), 1)
    status = bed.phase("flaky", "Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert bed.events("flaky").count("StageRestarting") == 2


def test_a_preempted_trainer_restarts_its_stage_without_counting_a_restart(bed: Bed) -> None:
    """The scheduler preempts the trainer pod (DisruptionTarget, Failed): the stage restarts
    under a new attempt with status.restarts unchanged and the disruption counted (condition
    and Event Disrupted naming the pod and the reason); a plain failure afterwards counts."""
    bed.apply_run("preempted", stages=1)
    first = bed.running_trainer("preempted", "fre")
    name = first["metadata"]["name"]
    with bed.condition_reasons("preempted", "Running") as reasons:
        bed.disrupt(first, "PreemptionByScheduler", "Preempted by ns/urgent on node kwok-gpu-0")
        bed.wait("a disruption", lambda: bed.status("preempted").get("disruptions") == 1, 30)
        second = bed.running_trainer("preempted", "fre")
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    assert second["metadata"]["labels"]["lmmr1.io/attempt"] == "1"
    status = bed.status("preempted")
    assert status.get("restarts", 0) == 0 and status["phase"] != "Failed"
    assert (status["stages"][0]["restarts"], status["stages"][0]["disruptions"]) == (0, 1)
    disrupted = [r for r in reasons if r.startswith("Disrupted: ")]
    assert (
        disrupted and f"pod {name} ended by Kubernetes (PreemptionByScheduler" in (disrupted[0])
    ), reasons
    (message,) = bed.event_messages("preempted", "Disrupted")
    assert f"pod {name} ended by Kubernetes (PreemptionByScheduler: Preempted by" in message
    assert "disruption 1, not counted against backoffLimit=2" in message
    assert "StageRestarting" not in bed.events("preempted")
    bed.exit(second, 1)
    bed.wait("a counted restart", lambda: bed.status("preempted").get("restarts") == 1, 30)
    assert bed.status("preempted")["disruptions"] == 1


def test_the_job_controller_names_a_disruption_as_the_operator_reads_it(bed: Bed) -> None:
    """The trainer Job's pod failure policy on the real Job controller: a disrupted pod
    fails the Job (reason PodFailurePolicy) with a message `podstate.job_disruption`
    recognises, which is all the operator has once the pod is gone."""
    restricted = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "policy-check"},
        "spec": {
            "backoffLimit": 0,
            "podFailurePolicy": trainer.POD_FAILURE_POLICY,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"type": "kwok"},
                    "containers": [
                        {
                            "name": "work",
                            "image": "example.com/work:1",
                            "securityContext": restricted,
                        }
                    ],
                }
            },
        },
    }
    bed.kubectl("apply", "-f", "-", stdin=json.dumps(job))
    try:

        def running() -> dict[str, Any] | None:
            pods = bed.pods("job-name=policy-check")
            return pods[0] if pods and pods[0]["status"].get("phase") == "Running" else None

        pod = bed.wait("the Job's pod Running", running, 30)
        bed.disrupt(pod, "EvictionByEvictionAPI", "Eviction API: evicting")

        def failed() -> dict[str, Any] | None:
            found = json.loads(bed.kubectl("get", "job", "policy-check", "-o", "json").stdout)
            return found if podstate.job_condition(found, "Failed") else None

        ended = bed.wait("the Job Failed", failed, 30)
        condition = next(c for c in ended["status"]["conditions"] if c["type"] == "Failed")
        assert condition["reason"] == "PodFailurePolicy", condition
        message = podstate.job_disruption(ended)
        assert message == (
            f"Pod {bed.ns}/{pod['metadata']['name']} has condition DisruptionTarget matching "
            "FailJob rule at index 0"
        ), condition
    finally:
        bed.kubectl("delete", "job", "policy-check", "--wait=false", check=False)


def test_a_config_error_exit_code_fails_at_once(bed: Bed) -> None:
    bed.apply_run("badconfig", stages=1)
    bed.exit(bed.running_trainer("badconfig", "fre"), 78)
    status = bed.phase("badconfig", "Failed")
    assert status.get("restarts", 0) == 0
    assert "ConfigError" in [c["reason"] for c in status["conditions"]]


def test_suspend_stops_pods_and_resume_restarts_them(bed: Bed) -> None:
    bed.apply_run("pausable", stages=1)
    bed.running_trainer("pausable", "fre")
    bed.kubectl("patch", "lmr", "pausable", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    bed.phase("pausable", "Suspended")
    bed.wait("pods gone", lambda: not bed.pods("lmmr1.io/run=pausable"), 30)
    bed.kubectl("patch", "lmr", "pausable", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    bed.running_trainer("pausable", "fre")
    assert "Resumed" in bed.events("pausable")


def test_missing_secret_is_a_condition_until_it_exists(bed: Bed) -> None:
    bed.apply_run(
        "nosecret",
        stages=1,
        storage={
            "uri": f"s3://{bed.bucket}/runs",
            "endpoint": bed.testbed.s3_endpoint,
            "credentialsSecret": "later",
        },
    )
    status = bed.wait(
        "Blocked",
        lambda: next(
            (
                c
                for c in (bed.status("nosecret").get("conditions") or [])
                if c["type"] == "Blocked" and c["status"] == "True"
            ),
            None,
        ),
        30,
    )
    assert status["reason"] == "SecretNotFound" and "'later'" in status["message"]
    assert not bed.pods("lmmr1.io/run=nosecret")
    bed.kubectl(
        "create",
        "secret",
        "generic",
        "later",
        "--from-literal=AWS_ACCESS_KEY_ID=a",
        "--from-literal=AWS_SECRET_ACCESS_KEY=b",
    )
    bed.running_trainer("nosecret", "fre")


def test_unschedulable_gpus_show_as_a_condition(bed: Bed) -> None:
    bed.apply_run("toobig", stages=1, trainer_gpus=16)  # the GPU nodes have 8 each
    blocked = bed.wait(
        "Blocked",
        lambda: next(
            (
                c
                for c in (bed.status("toobig").get("conditions") or [])
                if c["type"] == "Blocked" and c["status"] == "True"
            ),
            None,
        ),
        60,
    )
    assert blocked["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in blocked["message"]
    assert "Unschedulable" in bed.events("toobig")


def test_deadline_fails_and_ttl_deletes_the_run_and_its_children(bed: Bed) -> None:
    bed.apply_run("shortlived", stages=1, activeDeadlineSeconds=8, ttlSecondsAfterFinished=3)
    bed.running_trainer("shortlived", "fre")
    status = bed.phase("shortlived", "Failed", 30)
    assert "DeadlineExceeded" in [c["reason"] for c in status["conditions"]]
    bed.wait(
        "run deleted by TTL",
        lambda: bed.kubectl("get", "lmr", "shortlived", check=False).returncode != 0,
        30,
    )
    bed.wait("children garbage-collected", lambda: not bed.pods("lmmr1.io/run=shortlived"), 30)


def test_killing_the_operator_midway_loses_nothing_and_duplicates_nothing(bed: Bed) -> None:
    bed.apply_run("survivor", rollout_mode="separate")
    bed.running_trainer("survivor", "fre")
    bed.report("survivor", stage="fre", step=2, total_steps=4, reward=0.5)
    bed.wait("progress", lambda: bed.status("survivor").get("step") == 2, 10)
    bed.kubectl("delete", "pods", "-l", "app.kubernetes.io/component=operator", "--wait=false")
    final = bed.finish_stage("survivor", "fre")  # while the operator is restarting
    bed.wait("stage mgt", lambda: bed.status("survivor").get("stage") == "mgt", 60)
    bed.running_trainer("survivor", "mgt")
    assert len(bed.pods("lmmr1.io/run=survivor,lmmr1.io/role=rollout")) == 1
    assert bed.status("survivor")["stages"][0]["finalCheckpoint"] == final
    status = bed.status("survivor")
    assert status.get("restarts", 0) == 0 and status["stages"][0]["restarts"] == 0
    assert len(bed.pods("lmmr1.io/run=survivor,lmmr1.io/role=trainer")) == 1
    # Events are best-effort (an operator killed right after a transition may not have
    # posted its event yet), but a transition is never posted twice.
    assert bed.events("survivor").count("StageSucceeded") <= 1


def test_metrics_endpoint_reports_runs_by_phase(bed: Bed) -> None:
    pods = bed.pods("app.kubernetes.io/component=operator")
    ip = next(p["status"]["podIP"] for p in pods if p["status"].get("phase") == "Running")

    def scrape() -> str | None:
        with urllib.request.urlopen(f"http://{ip}:9090/metrics", timeout=5) as response:
            text = str(response.read().decode())
        return text if "lmmr1_runs{" in text else None

    text = bed.wait("metrics", scrape, 30)
    assert "lmmr1_reconcile_duration_seconds_count" in text


def test_deleting_a_run_removes_every_child_but_keeps_checkpoints(bed: Bed) -> None:
    bed.apply_run("doomed", stages=1)
    bed.running_trainer("doomed", "fre")
    bed.commit("doomed", "fre", 1)
    bed.kubectl("delete", "lmr", "doomed", "--wait=true", "--timeout=60s")
    bed.wait(
        "children removed",
        lambda: (
            not bed.pods("lmmr1.io/run=doomed")
            and not bed.kubectl(
                "get", "jobs,configmaps,secrets,services", "-l", "lmmr1.io/run=doomed", "-o", "name"
            ).stdout.strip()
        ),
        60,
    )
    listed = bed.s3.list_objects_v2(Bucket=bed.bucket, Prefix=f"runs/{bed.ns}/doomed/")
    assert listed["KeyCount"] == 2


def test_a_run_created_again_under_its_name_adopts_nothing_of_the_old_one(bed: Bed) -> None:
    """The old run is deleted with `--cascade=orphan`: its Job, config and progress report
    stay, without an owner. A new run of the same name (another UID) must neither read the
    old report nor take the old Job as its trainer: it says which names are taken, and once
    they are deleted it starts its own stage, checkpointing under its own UID."""
    bed.apply_run("again", stages=1)
    old_trainer = bed.running_trainer("again", "fre")
    old_uid = bed.run("again")["metadata"]["uid"]
    bed.report("again", stage="fre", step=5, total_steps=8, reward=0.5, accuracy=0.25)
    bed.wait("old progress", lambda: bed.status("again").get("step") == 5, 20)
    bed.kubectl("delete", "lmr", "again", "--cascade=orphan", "--wait=true", "--timeout=60s")
    bed.apply_run("again", stages=1)
    new_uid = bed.run("again")["metadata"]["uid"]
    assert new_uid != old_uid
    refused = bed.wait(
        "names taken",
        lambda: (c := condition(bed, "again", "ChildrenCreated", "False")) and c,
        30,
    )
    assert "again-fre-t0 already exists and is not this run's" in refused["message"]
    assert "again-progress already exists and is not this run's" in refused["message"]
    status = bed.status("again")
    assert status.get("step") is None and status.get("reward") is None  # not the old report
    assert (
        bed.pods("lmmr1.io/run=again,lmmr1.io/role=trainer")[0]["metadata"]["uid"]
        == (
            old_trainer["metadata"]["uid"]  # left alone: not the new run's to delete
        )
    )
    # The user deletes the orphans (a deleted run's children the garbage collector takes).
    orphans = "jobs,configmaps,secrets,services,networkpolicies,roles,rolebindings"
    for kind in orphans.split(","):
        for obj in json.loads(
            bed.kubectl("get", kind, "-l", "lmmr1.io/run=again", "-o", "json").stdout
        )["items"]:
            if not obj["metadata"].get("ownerReferences"):
                bed.kubectl("delete", kind, obj["metadata"]["name"], "--wait=true")
    trainer = bed.wait(
        "the new run's trainer",
        lambda: next(
            (
                p
                for p in bed.pods("lmmr1.io/run=again,lmmr1.io/role=trainer")
                if p["metadata"]["uid"] != old_trainer["metadata"]["uid"]
                and p["status"].get("phase") == "Running"
            ),
            None,
        ),
        60,
    )
    job = json.loads(bed.kubectl("get", "job", "again-fre-t0", "-o", "json").stdout)
    assert [o["uid"] for o in job["metadata"]["ownerReferences"]] == [new_uid]
    assert trainer["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    bed.wait("children created", lambda: condition(bed, "again", "ChildrenCreated") is not None, 30)
    assert bed.commit("again", "fre", 1).endswith(f"/again/{new_uid}/fre/step-1")
    config = json.loads(bed.kubectl("get", "configmap", "again-fre-config", "-o", "json").stdout)
    assert f"/runs/{bed.ns}/again/{new_uid}/fre" in config["data"]["stage.yaml"]


def test_an_s3_endpoint_that_hangs_blocks_only_its_own_run_with_a_clear_condition(
    bed: Bed,
) -> None:
    """The operator confirms a final checkpoint in S3 before the next stage starts from it.
    A run whose endpoint never answers waits, says why (Blocked, CheckpointUnverified, a
    Warning Event) and keeps its stage; another run goes on to its next stage meanwhile."""
    with endpoint_that_hangs() as url:
        storage = {"uri": f"s3://{bed.bucket}/runs", "endpoint": url, "credentialsSecret": "s3"}
        bed.apply_run("hangs", storage=storage)
        bed.apply_run("flows")
        bed.finish_stage("hangs", "fre")
        bed.finish_stage("flows", "fre")
        bed.wait("flows in stage mgt", lambda: bed.status("flows").get("stage") == "mgt", 60)
        blocked = bed.wait("hangs blocked", lambda: condition(bed, "hangs", "Blocked"), 120)
        assert blocked["reason"] == "CheckpointUnverified", blocked
        assert f"/hangs/{bed.run('hangs')['metadata']['uid']}/fre/step-4" in blocked["message"]
        assert url in blocked["message"], blocked  # botocore's timeout names the endpoint
        status = bed.status("hangs")
        assert (status["stage"], status.get("restarts") or 0) == ("fre", 0)
        assert bed.event_messages("hangs", "CheckpointUnverified")


def condition(bed: Bed, run: str, kind: str, status: str = "True") -> Any:
    return next(
        (
            c
            for c in (bed.status(run).get("conditions") or [])
            if c["type"] == kind and c["status"] == status
        ),
        None,
    )


def test_every_child_of_a_run_is_admitted_in_a_restricted_namespace(bed: Bed) -> None:
    """The module's namespace enforces Pod Security `restricted`: the rollout pods and the
    trainer Job's pod are admitted as they are."""
    bed.apply_run("admitted", stages=1, rollout_mode="separate")
    trainer = bed.running_trainer("admitted", "fre")
    rollouts = bed.pods("lmmr1.io/run=admitted,lmmr1.io/role=rollout")
    assert len(rollouts) == 2
    for pod in [trainer, *rollouts]:
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert condition(bed, "admitted", "ChildrenCreated", "False") is None


def test_a_pod_the_namespace_refuses_shows_on_the_run(bed: Bed) -> None:
    """A run that asks for root in a `restricted` namespace: the API server refuses its pods,
    and the run says so (condition and Warning Event), not only the operator's log."""
    bed.apply_run("asroot", stages=1, securityContext={"runAsUser": 0})
    committed = bed.commit("asroot", "fre", 2)  # as if an earlier attempt had committed it
    refused = bed.wait(
        "ChildrenCreated=False", lambda: condition(bed, "asroot", "ChildrenCreated", "False")
    )
    assert refused["reason"] == "CreateFailed"
    assert 'violates PodSecurity "restricted' in refused["message"]
    assert "runAsUser=0" in refused["message"] or "runAsNonRoot" in refused["message"]
    assert "CreateFailed" in bed.events("asroot")
    assert not bed.pods("lmmr1.io/run=asroot")
    assert bed.status("asroot").get("phase") != "Failed"  # the operator keeps trying
    key = committed.removeprefix(f"s3://{bed.bucket}/") + "/manifest.json"
    assert bed.s3.get_object(Bucket=bed.bucket, Key=key)["Body"].read() == b"{}"


def test_an_image_the_node_cannot_pull_blocks_the_run_with_its_reason(bed: Bed) -> None:
    """On the process node, as on a cluster without the image: the rollout pod waits in
    ErrImagePull/ImagePullBackOff, and the run shows Blocked with the pull error."""
    bed.apply_run(
        "nopull",
        stages=1,
        rollout_mode="separate",
        images={"rollout": "ghcr.io/lmmr1/lmmr1-trainer:0.1.0"},  # the CUDA image
        nodeSelector={"lmmr1.io/process-node": "true"},
        tolerations=[{"key": "lmmr1.io/process-node", "operator": "Exists"}],
    )
    committed = bed.commit("nopull", "fre", 2)  # as if an earlier attempt had committed it
    blocked = bed.wait("Blocked", lambda: condition(bed, "nopull", "Blocked"), 90)
    assert blocked["reason"] == "ImagePullError"
    assert "lmmr1-trainer:0.1.0" in blocked["message"]
    assert "ImagePullError" in bed.events("nopull")
    key = committed.removeprefix(f"s3://{bed.bucket}/") + "/manifest.json"
    assert bed.s3.get_object(Bucket=bed.bucket, Key=key)["Body"].read() == b"{}"


def test_a_trainer_that_stops_reporting_is_stalled_and_resumes_from_its_checkpoint(
    bed: Bed,
) -> None:
    """The trainer reports a step and commits a checkpoint, then freezes (its pod keeps
    running, nothing more arrives): past stallTimeoutSeconds the run says Stalled (condition
    and Warning Event, with the time and the last step), its trainer pod is replaced, and
    the committed checkpoint stays in S3 and in status.lastCheckpoint."""
    timeout = 8
    bed.apply_run("frozen", stages=1, stallTimeoutSeconds=timeout)
    first = bed.running_trainer("frozen", "fre")
    bed.wait("the stall clock", lambda: bed.status("frozen").get("lastProgressTime"), 10)
    # A report half-way resets the clock: without that, the stall would come about
    # timeout/2 after the report, not `timeout` (less one second: times have seconds).
    time.sleep(timeout / 2)
    checkpoint = bed.commit("frozen", "fre", 2)
    with bed.condition_reasons("frozen", "Running") as reasons:
        reported = time.monotonic()
        bed.report(
            "frozen", stage="fre", step=3, total_steps=8, reward=0.3, last_checkpoint=checkpoint
        )
        bed.wait("Stalled", lambda: "Stalled" in bed.events("frozen"), 30)
        stalled_after = time.monotonic() - reported
        # Keep the next attempt running for the checks below (the field is mutable).
        bed.kubectl(
            "patch", "lmr", "frozen", "--type=merge", "-p", '{"spec":{"stallTimeoutSeconds":600}}'
        )
    assert stalled_after >= timeout - 1, stalled_after
    (message,) = bed.event_messages("frozen", "Stalled")
    assert f"(stallTimeoutSeconds={timeout}) since 20" in message
    assert f"last at step 3; last checkpoint {checkpoint}" in message
    assert "restart 1/2" in message
    stalled = [r for r in reasons if r.startswith("Stalled: ")]
    assert stalled and "last at step 3" in stalled[0], reasons

    second = bed.running_trainer("frozen", "fre")
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    assert second["metadata"]["labels"]["lmmr1.io/attempt"] == "1"
    status = bed.status("frozen")
    assert status["restarts"] == 1 and status["lastCheckpoint"] == checkpoint
    key = checkpoint.removeprefix(f"s3://{bed.bucket}/") + "/manifest.json"
    assert bed.s3.get_object(Bucket=bed.bucket, Key=key)["Body"].read() == b"{}"
    config = bed.kubectl(
        "get", "configmap", "frozen-fre-config", "-o", "jsonpath={.data.stage\\.yaml}"
    ).stdout
    assert f"uri: {checkpoint.rsplit('/', 1)[0]}\n" in config  # resumes from its newest step


def test_each_stage_gets_ingress_policies_owned_by_its_run(bed: Bed) -> None:
    """Separate mode: the trainer's policy admits the stage's trainer and rollout pods, the
    rollout servers' the same two; both owned by the run and gone with the stage. (The test
    bed enforces no NetworkPolicy: this checks what is created, not what it blocks.)"""
    bed.apply_run("fenced", stages=1, rollout_mode="separate")
    trainer_pod = bed.running_trainer("fenced", "fre")
    run = bed.run("fenced")
    listed = json.loads(
        bed.kubectl("get", "networkpolicies", "-l", "lmmr1.io/run=fenced", "-o", "json").stdout
    )
    policies = {p["metadata"]["name"]: p for p in listed["items"]}
    assert set(policies) == {"fenced-fre-trainer", "fenced-fre-rollout"}

    def selector(match: dict[str, str]) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(match.items()))

    def selected(peer: dict[str, Any]) -> set[str]:
        return {
            p["metadata"]["name"] for p in bed.pods(selector(peer["podSelector"]["matchLabels"]))
        }

    rollouts = {
        p["metadata"]["name"] for p in bed.pods("lmmr1.io/run=fenced,lmmr1.io/role=rollout")
    }
    trainers = {trainer_pod["metadata"]["name"]}
    for name, members in (("fenced-fre-trainer", trainers), ("fenced-fre-rollout", rollouts)):
        policy = policies[name]
        (owner,) = policy["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["uid"], owner["controller"]) == (
            "LMMR1Run",
            run["metadata"]["uid"],
            True,
        )
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert selected(policy["spec"]) == members
        (rule,) = policy["spec"]["ingress"]
        assert [selected(peer) for peer in rule["from"]] == [trainers, rollouts]
    bed.finish_stage("fenced", "fre")
    bed.phase("fenced", "Succeeded")
    bed.wait(
        "policies removed with the stage",
        lambda: (
            not bed.kubectl(
                "get", "networkpolicies", "-l", "lmmr1.io/run=fenced", "-o", "name"
            ).stdout.strip()
        ),
        30,
    )
