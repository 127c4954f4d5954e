"""Gang admission against the real Kueue and JobSet controllers (issue 15).

The operator, installed by its chart, runs each stage of a run with `spec.queueName` as one
JobSet; Kueue admits it as one workload on a ClusterQueue of 8 GPUs on the kwok nodes. Each
test plays the trainer as the operator tests do (tests/operator_bed.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from tests.operator_bed import Bed, installed_operator

from lmmr1_testbed import batch
from lmmr1_testbed.layout import TestBedState
from lmmr1_testbed.pytest_plugin import Cli

pytestmark = [pytest.mark.batch, pytest.mark.usefixtures("installed_manifests")]

QUEUE_GPUS = 8
HIGH, LOW = "lmmr1-test-high", "lmmr1-test-low"


def queue_objects(name: str, namespace: str) -> list[dict[str, Any]]:
    """A ResourceFlavor, a ClusterQueue of QUEUE_GPUS GPUs (lower priority is preempted
    within it) and the namespace's LocalQueue `name`; two PriorityClasses."""
    return [
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": HIGH},
            "value": 1000,
        },
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": LOW},
            "value": 10,
        },
        *batch.queue(
            name,
            namespace,
            # ephemeral-storage too: the trainer's scratch emptyDirs request it.
            {
                "cpu": "1000",
                "memory": "10Ti",
                "ephemeral-storage": "1Pi",
                "nvidia.com/gpu": str(QUEUE_GPUS),
            },
            preemption={"withinClusterQueue": "LowerPriority"},
        ),
    ]


class KueueBed(Bed):
    queue: str = ""

    def gang_run(self, name: str, *, trainer_gpus: int = 6, **spec: Any) -> None:
        """One stage: a trainer of `trainer_gpus` GPUs and two rollout servers of one GPU
        each in their own pods (8 GPUs by default: the whole ClusterQueue)."""
        spec.setdefault("queueName", self.queue)
        self.apply_run(name, stages=1, trainer_gpus=trainer_gpus, rollout_mode="separate", **spec)

    def run_pods(self, run: str) -> list[dict[str, Any]]:
        return self.pods(f"lmmr1.io/run={run}")

    def queued_for(self, run: str, words: str, timeout: float = 90) -> dict[str, Any]:
        """The run's status once it is Queued and its Admitted condition (False) carries
        `words` (Kueue's reason arrives a pass after the JobSet is created)."""

        def probe() -> dict[str, Any] | None:
            status = self.status(run)
            admitted = condition(status, "Admitted")
            if status.get("phase") != "Queued" or admitted is None:
                return None
            assert admitted["status"] == "False", status
            return status if words in admitted.get("message", "") else None

        return dict(self.wait(f"{run} Queued for {words!r}", probe, timeout))

    def workload(self, run: str) -> dict[str, Any]:
        """The Workload Kueue made for the run's current JobSet."""
        jobsets = json.loads(
            self.kubectl("get", "jobsets", "-l", f"lmmr1.io/run={run}", "-o", "json").stdout
        )["items"]
        assert len(jobsets) == 1, [j["metadata"]["name"] for j in jobsets]
        uid = jobsets[0]["metadata"]["uid"]
        workloads = json.loads(
            self.kubectl(
                "get", "workloads.kueue.x-k8s.io", "-l", f"kueue.x-k8s.io/job-uid={uid}",
                "-o", "json",
            ).stdout
        )["items"]  # fmt: skip
        assert len(workloads) == 1
        return dict(workloads[0])


def condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for entry in status.get("conditions") or []:
        if entry["type"] == kind:
            return dict(entry)
    return None


@pytest.fixture(scope="module")
def bed(
    batch_controllers: TestBedState, s3_client: Any, installed_manifests: Any
) -> Iterator[KueueBed]:
    with installed_operator(
        batch_controllers,
        s3_client,
        prefix="t-kueue",
        bed_class=KueueBed,
        # A real install's check of the cluster's APIs (helm fills .Capabilities from them).
        kueue={"enabled": True},
    ) as installed:
        assert isinstance(installed, KueueBed)
        installed.queue = installed.ns
        admin = Cli(batch_controllers, "kubectl")
        objects = {
            "apiVersion": "v1",
            "kind": "List",
            "items": queue_objects(installed.ns, installed.ns),
        }
        admin("apply", "--server-side", "-f", "-", stdin=json.dumps(objects))
        try:
            yield installed
        finally:
            installed.cleanup()
            installed.kubectl("delete", "jobsets", "--all", "--wait=true", check=False)
            # Kueue's finalizers: delete its objects while it runs.
            installed.kubectl("delete", "localqueue", installed.queue, check=False)
            admin("delete", "clusterqueue,resourceflavor", installed.queue, check=False)


@pytest.fixture(autouse=True)
def _delete_runs_after_each_test(bed: KueueBed) -> Iterator[None]:
    yield
    bed.cleanup()
    bed.wait("the test's JobSets gone", lambda: not bed.pods("lmmr1.io/run"), timeout=90)


def test_a_second_run_of_8_gpus_is_queued_with_no_pods_until_the_first_finishes(
    bed: KueueBed,
) -> None:
    bed.gang_run("first")
    bed.running_trainer("first", "fre")
    assert len(bed.pods("lmmr1.io/run=first,lmmr1.io/role=rollout")) == 2
    assert "Admitted" in bed.events("first")

    bed.gang_run("second")
    # Kueue's own words on the run: which resource did not fit.
    bed.queued_for("second", "nvidia.com/gpu")
    printed = bed.kubectl("get", "lmr", "second").stdout
    assert "Queued" in printed, printed
    assert bed.run_pods("second") == []

    bed.finish_stage("first", "fre")
    bed.phase("first", "Succeeded")
    bed.running_trainer("second", "fre")
    assert condition(bed.status("second"), "Admitted")["status"] == "True"  # type: ignore[index]
    assert bed.event_messages("second", "Admitted")


def test_a_higher_priority_run_preempts_and_the_preempted_run_resumes_uncounted(
    bed: KueueBed,
) -> None:
    bed.gang_run("low", priorityClassName=LOW)
    first_trainer = bed.running_trainer("low", "fre")
    checkpoint = bed.commit("low", "fre", 2)
    bed.report("low", stage="fre", step=2, total_steps=8, reward=0.3, last_checkpoint=checkpoint)
    restarts_before = bed.status("low").get("stages", [{}])[0].get("restarts", 0)

    bed.gang_run("high", priorityClassName=HIGH)
    preempted = bed.phase("low", "Queued", timeout=90)
    assert condition(preempted, "Admitted")["reason"] == "Preempted", preempted  # type: ignore[index]
    bed.wait("the low run's pods gone", lambda: not bed.run_pods("low"), timeout=90)
    bed.running_trainer("high", "fre")
    assert bed.event_messages("low", "Preempted")

    bed.finish_stage("high", "fre")
    bed.phase("high", "Succeeded")
    resumed = bed.running_trainer("low", "fre")
    assert resumed["metadata"]["uid"] != first_trainer["metadata"]["uid"]
    status = bed.status("low")
    assert status["phase"] == "Running"
    # Not a failure: nothing counted against backoffLimit, and the same attempt (the same
    # JobSet, unsuspended), whose trainer resumes from the last committed checkpoint.
    assert status["stages"][0].get("restarts", 0) == restarts_before
    assert (
        resumed["metadata"]["labels"]["lmmr1.io/attempt"]
        == (first_trainer["metadata"]["labels"]["lmmr1.io/attempt"])
    )
    assert status.get("lastCheckpoint") == checkpoint


def test_spec_suspend_and_kueues_own_deactivation_both_stop_and_restart_the_stage(
    bed: KueueBed,
) -> None:
    bed.gang_run("pausing")
    bed.running_trainer("pausing", "fre")

    bed.kubectl("patch", "lmr", "pausing", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    bed.phase("pausing", "Suspended")
    bed.wait("pods gone on suspend", lambda: not bed.run_pods("pausing"), timeout=90)
    bed.kubectl("patch", "lmr", "pausing", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    bed.running_trainer("pausing", "fre")

    # Kueue's own suspend: an administrator deactivates the Workload.
    workload = bed.workload("pausing")["metadata"]["name"]
    bed.kubectl(
        "patch", "workloads.kueue.x-k8s.io", workload, "--type=merge",
        "-p", '{"spec":{"active":false}}',
    )  # fmt: skip
    bed.phase("pausing", "Queued", timeout=90)
    bed.wait("pods gone on deactivation", lambda: not bed.run_pods("pausing"), timeout=90)
    bed.kubectl(
        "patch", "workloads.kueue.x-k8s.io", workload, "--type=merge",
        "-p", '{"spec":{"active":true}}',
    )  # fmt: skip
    bed.running_trainer("pausing", "fre")
    assert bed.status("pausing").get("stages", [{}])[0].get("restarts", 0) == 0


def test_an_unknown_queue_and_a_request_larger_than_the_queue_show_kueues_reason(
    bed: KueueBed,
) -> None:
    bed.gang_run("lost", queueName="no-such-queue")
    bed.gang_run("huge", trainer_gpus=16)
    for run, words in (("lost", "no-such-queue"), ("huge", "nvidia.com/gpu")):
        bed.queued_for(run, words)
        assert bed.run_pods(run) == []
    # Nothing hangs: another run in the same queue is still admitted and runs.
    bed.gang_run("fits", trainer_gpus=2)
    bed.running_trainer("fits", "fre")


def test_a_failed_trainer_fails_the_jobset_counted_and_a_disruption_restarts_it_uncounted(
    bed: KueueBed,
) -> None:
    """JobSet's failure policy (maxRestarts 0) on the real controller: a trainer that exits
    1 fails its Job, so the JobSet; the operator counts a restart and creates the next
    attempt's JobSet, which Kueue admits again. A preempted pod (DisruptionTarget) fails its
    Job by the trainer's pod failure policy; that restart is not counted."""
    bed.gang_run("flaky", backoffLimit=3)
    first = bed.running_trainer("flaky", "fre")
    bed.exit(first, 1)
    bed.wait("a counted restart", lambda: bed.status("flaky").get("restarts") == 1, 90)
    second = bed.running_trainer("flaky", "fre")
    assert second["metadata"]["labels"]["lmmr1.io/attempt"] == "1"
    assert second["metadata"]["name"].startswith("flaky-fre-g1-trainer-0-0")
    bed.disrupt(second, "PreemptionByScheduler", "Preempted by ns/urgent on node kwok-gpu-0")
    bed.wait("a disruption", lambda: bed.status("flaky").get("disruptions") == 1, 90)
    third = bed.running_trainer("flaky", "fre")
    assert third["metadata"]["labels"]["lmmr1.io/attempt"] == "2"
    status = bed.status("flaky")
    assert (status["restarts"], status["stages"][0]["disruptions"]) == (1, 1), status
    assert bed.events("flaky").count("StageRestarting") == 1


# Last in this module: it removes the JobSet CRD (every JobSet with it) and puts it back.
def test_a_missing_jobset_crd_blocks_the_run_with_what_to_install(
    bed: KueueBed, batch_controllers: TestBedState
) -> None:
    admin = Cli(batch_controllers, "kubectl")
    admin("delete", "crd", "jobsets.jobset.x-k8s.io", "--wait=true", timeout=120)
    try:
        bed.gang_run("nojobset")
        blocked = bed.wait(
            "the run Blocked for want of JobSet",
            lambda: (
                (found := condition(bed.status("nojobset"), "Blocked"))
                and found["status"] == "True"
                and found
            ),
            timeout=90,
        )
        assert blocked["reason"] == "JobSetNotInstalled", blocked
        assert "JobSet v0.11.1" in blocked["message"], blocked
        assert bed.event_messages("nojobset", "JobSetNotInstalled")
        assert bed.run_pods("nojobset") == []
    finally:
        batch.install_crds(batch_controllers)
    # Installed again, the same run goes on by itself (the operator asks discovery about a
    # kind it found missing again after a minute: kube.MISSING_KIND_RETRY_S).
    bed.wait(
        "the run admitted once JobSet is back",
        lambda: bed.pods("lmmr1.io/run=nojobset,lmmr1.io/role=trainer"),
        timeout=180,
    )
