"""End to end: the operator (installed by its chart) runs examples/run-tiny.yaml on the
process node with the real trainer (generating with its colocated vLLM engine) and verifier
on CPU — FRE, then MGT from FRE's final checkpoint — and survives its trainer being killed
mid-stage. The run tracks its steps in TensorBoard, the test bed's MLflow server and W&B
(offline) from inside its restricted pods (read-only root filesystem)."""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytest

from lmmr1_testbed.demo import driver, seed
from lmmr1_testbed.demo.tracking import tracking_spec
from lmmr1_testbed.layout import TestBedState
from lmmr1_testbed.waiting import wait_for

NAMESPACE = "lmmr1-e2e"


@pytest.fixture(scope="module")
def seeded(testbed: TestBedState, s3_client: Any) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, **testbed.s3_env(), "DS_ACCELERATOR": "cpu"}
        return seed.seed(s3_client, env, Path(work), warm_start_steps=40, dataset_rows=16)


def trainer_pid(testbed: TestBedState, stage: str) -> int | None:
    pods = json.loads(
        driver.cli(
            testbed,
            "kubectl",
            "get",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            f"lmmr1.io/run=tiny,lmmr1.io/stage={stage},lmmr1.io/role=trainer",
            "-o",
            "json",
        ).stdout
    )
    for pod in pods["items"]:
        for status in pod["status"].get("containerStatuses", []):
            if status["name"] == "trainer" and "running" in status.get("state", {}):
                return int(status["containerID"].removeprefix("process://"))
    return None


def committed_steps(s3_client: Any, stage_uri: str) -> list[int]:
    """The steps under a stage's checkpoint URI whose manifest is written (committed)."""
    bucket, _, prefix = stage_uri.removeprefix("s3://").partition("/")
    steps = []
    paginator = s3_client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/step-"):
        for item in page.get("Contents", []):
            found = re.fullmatch(rf"{re.escape(prefix)}/step-(\d+)/manifest\.json", item["Key"])
            if found:
                steps.append(int(found.group(1)))
    return sorted(steps)


# Three trainer starts, each with its colocated vLLM engine (measured 30-40 s to start in a
# pod on a loaded 2-core machine, most of it vLLM inspecting the model class in a fresh
# HOME), plus two stages of steps: more than the suite's default 600 s.
@pytest.mark.timeout(1200)
def test_fre_then_mgt_with_a_killed_trainer_resuming(
    testbed: TestBedState, s3_client: Any, seeded: dict[str, str]
) -> None:
    try:
        driver.install_operator(
            testbed, namespace=NAMESPACE, release="e2e", watch_namespace=NAMESPACE
        )
        driver.prepare_namespace(testbed, NAMESPACE)
        run_and_check(testbed, s3_client)
    finally:  # pass or fail: stop the run's pods and the operator, which load the machine
        driver.delete_run(testbed, NAMESPACE, "tiny")
        driver.cli(testbed, "helm", "uninstall", "e2e", "-n", NAMESPACE, check=False)


def run_and_check(testbed: TestBedState, s3_client: Any) -> None:
    run = driver.example_run(episodes=4, maxSteps=6)
    for stage in run["spec"]["stages"]:
        stage["checkpoint"] = {"everySteps": 2, "keepLast": 2}
    run["spec"]["stages"][0]["algorithm"]["maxSteps"] = 10  # a window to kill it in
    run["spec"]["tracking"] = {
        **tracking_spec(testbed),
        "wandb": {"project": "lmmr1-e2e", "mode": "offline"},
    }
    driver.apply_run(testbed, NAMESPACE, run)

    # Kill the FRE trainer once it has committed two checkpoints (steps 2 and 4, or later
    # ones) and moved past the newer: it must resume from the newest, and redo what followed.
    def fre_checkpointed() -> dict[str, Any] | None:
        status = driver.follow(testbed, NAMESPACE, "tiny", timeout=0.1, poll=0).status
        assert status.get("phase") not in ("Succeeded", "Failed"), status
        checkpoint = str(status.get("lastCheckpoint") or "")
        at = int(checkpoint.rsplit("-", 1)[-1]) if "/fre/step-" in checkpoint else 0
        ahead = at >= 4 and (status.get("step") or 0) > at
        return status if status.get("stage") == "fre" and ahead else None

    seen = wait_for(
        "FRE past its second committed checkpoint",
        fre_checkpointed,
        timeout=420,
        state=testbed,
        namespace=NAMESPACE,
        interval=0.2,
    )
    pid = trainer_pid(testbed, "fre")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    # What the restarted trainer must resume from: the newest checkpoint committed when the
    # trainer died (read from S3 now, before any restart can commit another).
    fre_uri = str(seen["lastCheckpoint"]).rsplit("/step-", 1)[0]
    committed = committed_steps(s3_client, fre_uri)
    assert len(committed) >= 2, (fre_uri, committed)
    expected = committed[-1]

    watch = driver.follow(testbed, NAMESPACE, "tiny", timeout=900)
    status = watch.status
    logs = driver.trainer_logs(testbed, NAMESPACE, "tiny")
    assert status.get("phase") == "Succeeded", f"{json.dumps(status, indent=1)}\n{logs[-4000:]}"
    fre, mgt = status["stages"]
    assert fre["restarts"] == 1 and status["restarts"] == 1
    # The restarted trainer resumed from that checkpoint, not from step zero or another one.
    resumed = re.findall(r"resumed from (\S+)/fre/step-(\d+) \(step (\d+)\)", logs)
    assert resumed, logs[-3000:]
    assert [(int(r[1]), int(r[2])) for r in resumed] == [(expected, expected)], resumed
    assert f"resumed from {fre_uri}/step-{expected} " in logs
    first_after = re.findall(r'"step": (\d+)', logs.split("resumed from", 1)[1])[0]
    assert int(first_after) == expected + 1  # the step counter did not restart at 1
    assert fre["finalCheckpoint"].endswith("/fre/step-10")
    assert mgt["initCheckpoint"] == fre["finalCheckpoint"]
    assert mgt["finalCheckpoint"].endswith("/mgt/step-6")
    for final in (fre["finalCheckpoint"], mgt["finalCheckpoint"]):
        bucket, _, prefix = final.removeprefix("s3://").partition("/")
        manifest = s3_client.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")
        files = json.loads(manifest["Body"].read())["files"]
        assert any(f["path"].endswith("model.safetensors") for f in files)
    check_tracking(testbed, s3_client, fre["finalCheckpoint"].rsplit("/fre/", 1)[0])


def check_tracking(testbed: TestBedState, s3_client: Any, run_uri: str) -> None:
    """Both stages' steps reached MLflow (one MLflow run per stage, the killed and the
    resumed attempt of FRE in one), TensorBoard (a file per attempt, each step once) and W&B
    (an offline run directory per attempt), all from the pods."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    client = MlflowClient(tracking_uri=testbed.mlflow_url)
    experiment = client.get_experiment_by_name(f"{NAMESPACE}/tiny")
    assert experiment is not None
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["fre", "mgt"] and all(
        r.info.status == "FINISHED" for r in runs.values()
    )
    for stage, steps in (("fre", 10), ("mgt", 6)):
        logged = [
            m.step for m in client.get_metric_history(runs[stage].info.run_id, "train/reward")
        ]
        # A kill between two checkpoints redoes the steps after the older one: logged again.
        assert sorted(set(logged)) == list(range(1, steps + 1)), (stage, logged)
    assert runs["fre"].data.params["stage"] == "fre"

    bucket, _, prefix = run_uri.removeprefix("s3://").partition("/")
    with tempfile.TemporaryDirectory() as work:
        for stage, steps, attempts in (("fre", 10, 2), ("mgt", 6, 1)):
            listed = s3_client.list_objects_v2(
                Bucket=bucket, Prefix=f"{prefix}/tensorboard/{stage}/"
            )
            keys = [item["Key"] for item in listed.get("Contents", [])]
            assert len(keys) == attempts, keys
            folder = Path(work) / stage
            folder.mkdir()
            for key in keys:
                s3_client.download_file(bucket, key, str(folder / key.rsplit("/", 1)[1]))
            events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
            events.Reload()
            # Only checkpointed steps' files survive a kill: every step exactly once.
            assert [e.step for e in events.Scalars("train/reward")] == list(range(1, steps + 1))
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/wandb/fre/")
    runs_logged = {
        item["Key"].rsplit("/", 2)[-2]
        for item in listed.get("Contents", [])
        if item["Key"].endswith(".wandb")
    }
    assert len(runs_logged) == 2, runs_logged  # an offline run directory per attempt
