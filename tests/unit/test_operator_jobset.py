"""A stage attempt as one JobSet (children/jobset.py), checked against the real JobSet CRD's
schema (jobset v0.11.1, vendored in tests/fixtures/kube_crds) and the JobSet webhook's
naming rules."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from tests import kube_schema
from tests.stage_contexts import run_object, stage_context

from lmmr1_operator import naming
from lmmr1_operator.api.crd import MAX_RUN_NAME
from lmmr1_operator.api.spec import MAX_STAGE_NAME
from lmmr1_operator.children import jobset, rollout, stage_config, trainer
from lmmr1_operator.children.context import StageContext

# Names a Kueue WorkloadPriorityClass (not a PriorityClass): Kueue reads it on the JobSet
# before any pod template's priorityClassName (jobframework.ExtractPriority, kueue v0.17.0).
KUEUE_PRIORITY_CLASS = "kueue.x-k8s.io/priority-class"
SEPARATE = {"trainer": {"nodes": 2, "gpusPerNode": 8}, "rollout": {"replicas": 3}}


def context(
    *,
    name: str = "r",
    stage: str = "fre",
    resources: dict[str, Any] | None = None,
    attempt: int = 0,
    **spec: Any,
) -> StageContext:
    run = run_object(name, **spec)
    run["spec"]["stages"][0]["name"] = stage
    if resources is not None:
        run["spec"]["stages"][0]["resources"] = resources
    return stage_context(run, attempt=attempt)


def schema_errors(obj: dict[str, Any]) -> list[str]:
    return kube_schema.errors(obj, kube_schema.JOBSET, "v1alpha2")


def replicated(js: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [r for r in js["spec"]["replicatedJobs"] if r["name"] == name]
    return found


@pytest.mark.parametrize(
    "ctx",
    [
        context(),  # colocate: the trainer alone
        context(resources=SEPARATE, queueName="team-a", priorityClassName="high"),
        context(
            resources={"trainer": {"nodes": 1}, "rollout": {"mode": "separate", "replicas": 2}},
            nodeSelector={"pool": "gpu"},
            tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        ),
    ],
    ids=["colocate", "separate-queued", "separate-one-node"],
)
def test_the_jobset_is_valid_under_the_jobset_crd(ctx: StageContext) -> None:
    assert schema_errors(jobset.jobset(ctx)) == []


def test_the_schema_rejects_what_the_api_server_would() -> None:
    """The vendored schema, closed as the API server's strict field validation is, catches
    misspelt and mistyped fields at every depth (else the tests above prove nothing)."""
    good = jobset.jobset(context(resources=SEPARATE))

    def broken(change: Any) -> list[str]:
        obj = copy.deepcopy(good)
        change(obj)
        return schema_errors(obj)

    def misspelt_policy(o: Any) -> None:
        o["spec"]["successPolicy"]["operater"] = o["spec"]["successPolicy"].pop("operator")

    def misspelt_container_field(o: Any) -> None:
        pod = o["spec"]["replicatedJobs"][1]["template"]["spec"]["template"]["spec"]
        pod["containers"][0]["imagePullPolicyy"] = "Always"

    def replicas_as_string(o: Any) -> None:
        o["spec"]["replicatedJobs"][0]["replicas"] = "1"

    def unknown_operator(o: Any) -> None:
        o["spec"]["successPolicy"]["operator"] = "Most"

    def no_replicated_job_name(o: Any) -> None:
        del o["spec"]["replicatedJobs"][0]["name"]

    assert any("operater" in e for e in broken(misspelt_policy))
    assert any("imagePullPolicyy" in e for e in broken(misspelt_container_field))
    assert any(e.startswith("spec.replicatedJobs.0.replicas") for e in broken(replicas_as_string))
    assert any("Most" in e for e in broken(unknown_operator))
    assert any("'name' is a required property" in e for e in broken(no_replicated_job_name))


def test_the_trainer_replicated_job_is_the_trainer_job() -> None:
    """The same Job spec as the Job-based layout, but for what JobSet does itself: the pods'
    subdomain (its Service), rank 0's address in its DNS scheme, and the queue (the JobSet's
    alone)."""
    ctx = context(resources=SEPARATE, queueName="team-a")
    js = jobset.jobset(ctx)
    job = trainer.job(ctx)
    expected = copy.deepcopy(job["spec"])
    pod = expected["template"]
    del pod["metadata"]["labels"][naming.KUEUE_QUEUE]
    del pod["spec"]["subdomain"]
    (container,) = pod["spec"]["containers"]
    (master,) = [e for e in container["env"] if e["name"] == "MASTER_ADDR"]
    master["value"] = f"{js['metadata']['name']}-trainer-0-0.{js['metadata']['name']}.ns.svc"
    labels = {k: v for k, v in job["metadata"]["labels"].items() if k != naming.KUEUE_QUEUE}

    assert replicated(js, "trainer") == {
        "name": "trainer",
        "replicas": 1,
        "template": {"metadata": {"labels": labels}, "spec": expected},
    }
    spec = replicated(js, "trainer")["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert spec["backoffLimit"] == 0 and spec["podFailurePolicy"] == trainer.POD_FAILURE_POLICY


def test_a_single_node_trainer_keeps_its_own_address() -> None:
    ctx = context()
    pod = replicated(jobset.jobset(ctx), "trainer")["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MASTER_ADDR"] == "$(POD_IP)"
    assert [r["name"] for r in jobset.jobset(ctx)["spec"]["replicatedJobs"]] == ["trainer"]


def test_the_rollout_replicated_job_runs_every_server_as_an_index() -> None:
    ctx = context(resources=SEPARATE)
    rjob = replicated(jobset.jobset(ctx), "rollout")
    spec = rjob["template"]["spec"]
    assert (rjob["replicas"], spec["completionMode"]) == (1, "Indexed")
    assert spec["completions"] == spec["parallelism"] == 3
    assert spec["backoffLimit"] == 0 and spec["podFailurePolicy"] == trainer.POD_FAILURE_POLICY
    # Each replica's pod as rollout.pod builds it, less the per-replica name (the Job's
    # index gives it) and the subdomain (JobSet's).
    for replica in range(3):
        pod = rollout.pod(ctx, replica)
        expected = {k: v for k, v in pod["spec"].items() if k not in ("hostname", "subdomain")}
        assert spec["template"]["spec"] == expected
    labels = spec["template"]["metadata"]["labels"]
    assert labels[naming.LABEL_ROLE] == "rollout" and labels[naming.LABEL_ATTEMPT] == "0"
    assert rjob["template"]["metadata"]["labels"] == labels


def test_the_jobset_succeeds_with_the_trainer_and_never_restarts_itself() -> None:
    spec = jobset.jobset(context(resources=SEPARATE))["spec"]
    assert spec["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["trainer"]}
    assert spec["failurePolicy"] == {"maxRestarts": 0}
    name = jobset.jobset(context(resources=SEPARATE))["metadata"]["name"]
    assert spec["network"] == {"enableDNSHostnames": True, "subdomain": name}


def test_a_queued_jobset_is_created_suspended_for_kueue() -> None:
    queued = jobset.jobset(context(resources=SEPARATE, queueName="team-a", priorityClassName="hi"))
    assert queued["spec"]["suspend"] is True
    assert queued["metadata"]["labels"][naming.KUEUE_QUEUE] == "team-a"
    # The run's priority class is a PriorityClass: on the pods, where Kueue reads it without
    # a kueue.x-k8s.io/priority-class label (that names a WorkloadPriorityClass).
    assert KUEUE_PRIORITY_CLASS not in queued["metadata"]["labels"]
    for rjob in queued["spec"]["replicatedJobs"]:
        pod = rjob["template"]["spec"]["template"]
        assert pod["spec"]["priorityClassName"] == "hi"
        assert naming.KUEUE_QUEUE not in pod["metadata"]["labels"]
        assert naming.KUEUE_QUEUE not in rjob["template"]["metadata"]["labels"]

    unqueued = jobset.jobset(context(resources=SEPARATE))
    assert unqueued["spec"]["suspend"] is False
    assert naming.KUEUE_QUEUE not in unqueued["metadata"]["labels"]


def test_the_jobset_is_the_runs_child_and_names_its_attempt() -> None:
    js = jobset.jobset(context(attempt=4))
    meta = js["metadata"]
    assert (js["apiVersion"], js["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    assert (meta["name"], meta["namespace"]) == ("r-fre-g4", "ns")
    assert naming.owned_by(js, "uid-1")
    assert meta["labels"] == {
        **naming.stage_labels("r", "fre", "jobset"),
        naming.LABEL_ATTEMPT: "4",
    }
    # Attempts name their JobSets apart, wrapping as the Job's name does.
    assert naming.jobset("r", "fre", 1004) == "r-fre-g4" != naming.jobset("r", "fre", 5)


DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def webhook_name_errors(js: dict[str, Any]) -> list[str]:
    """The JobSet webhook's name checks (jobset v0.11.1 pkg/webhooks/jobset_webhook.go
    ValidateCreate): each Job's name, and each pod's name with a 5-character suffix at the
    largest indices, must be a DNS-1035 label; so must the subdomain."""
    name = js["metadata"]["name"]
    names = [js["spec"]["network"]["subdomain"]]
    for rjob in js["spec"]["replicatedJobs"]:
        last_job = rjob["replicas"] - 1
        last_pod = rjob["template"]["spec"]["completions"] - 1
        names.append(f"{name}-{rjob['name']}-{last_job}")
        names.append(f"{name}-{rjob['name']}-{last_job}-{last_pod}-abcde")
    return [n for n in names if len(n) > 63 or not DNS_1035.match(n)]


def test_the_longest_names_fit_the_jobset_webhook() -> None:
    run = "a" * (MAX_RUN_NAME - 1) + "b"
    stage = "s" * MAX_STAGE_NAME
    resources = {"trainer": {"nodes": 256}, "rollout": {"mode": "separate", "replicas": 256}}
    js = jobset.jobset(context(name=run, stage=stage, resources=resources, attempt=999))
    assert webhook_name_errors(js) == []
    assert len(js["metadata"]["name"]) == naming.MAX_JOBSET_NAME
    assert js["metadata"]["name"].endswith("-g999")
    # Cut short, the names of two stages that begin alike still differ.
    assert naming.jobset(run, stage, 0) != naming.jobset(run, stage[:-1] + "t", 0)
    # What fits stays readable.
    assert naming.jobset("run", "fre", 0) == "run-fre-g0"


def test_the_webhook_check_catches_a_name_too_long() -> None:
    """One character over the budget, at the largest topology, is refused (the budget is
    tight, not merely sufficient)."""
    largest = {"trainer": {"nodes": 256}, "rollout": {"mode": "separate", "replicas": 256}}
    js = jobset.jobset(context(resources=largest))
    assert webhook_name_errors(js) == []
    js["metadata"]["name"] = "x" * naming.MAX_JOBSET_NAME
    assert webhook_name_errors(js) == []
    js["metadata"]["name"] += "x"
    assert webhook_name_errors(js) == [
        f"{js['metadata']['name']}-{role}-0-255-abcde" for role in ("trainer", "rollout")
    ]


def test_rollout_urls_are_the_servers_jobset_hostnames() -> None:
    ctx = context(resources=SEPARATE)
    assert jobset.rollout_urls(ctx) == [
        f"http://r-fre-g0-rollout-0-{i}.r-fre-g0.ns.svc:{naming.ROLLOUT_PORT}" for i in range(3)
    ]
    # The same names as the rollout Job's pods get: `<job>-<index>`, the Job named
    # `<jobset>-<replicatedJob>-<jobIndex>` by JobSet.
    js = jobset.jobset(ctx)
    job_name = f"{js['metadata']['name']}-rollout-0"
    hosts = [url.removeprefix("http://").split(".")[0] for url in jobset.rollout_urls(ctx)]
    assert hosts == [f"{job_name}-{i}" for i in range(3)]
    # The trainer's stage config takes them as they are.
    assert stage_config.render(ctx, jobset.rollout_urls(ctx)).rollout.urls == (
        jobset.rollout_urls(ctx)
    )
    assert jobset.rollout_urls(context()) == []
