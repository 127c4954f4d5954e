"""End to end: the operator (installed by its chart) runs examples/run-tiny.yaml on the
process node with the real trainer (generating with its colocated vLLM engine) and verifier
on CPU — FRE, then MGT from FRE's final checkpoint — and survives its trainer being killed
mid-stage. Each stage evaluates its held-out set before its first step, every 4 steps and
after its last: the results reach the status, the operator's metrics and S3, and the
restarted FRE trainer reads its stored baseline back.
The run tracks its steps in TensorBoard, the test bed's MLflow server and W&B
(offline) from inside its restricted pods (read-only root filesystem)."""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from lmmr1_testbed.demo import driver
from lmmr1_testbed.demo.tracking import tracking_spec
from lmmr1_testbed.layout import TestBedState
from lmmr1_testbed.waiting import wait_for

NAMESPACE = "lmmr1-e2e"


def trainer_pid(testbed: TestBedState, stage: str) -> int | None:
    selector = f"lmmr1.io/run=tiny,lmmr1.io/stage={stage},lmmr1.io/role=trainer"
    for pod in driver.items(testbed, NAMESPACE, "pods", selector):
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


def operator_metrics(testbed: TestBedState) -> str:
    """The operator's /metrics (its pod IP: the process node's pods have no Service)."""
    pods = driver.items(testbed, NAMESPACE, "pods", "app.kubernetes.io/component=operator")
    ip = next(p["status"]["podIP"] for p in pods if p["status"].get("phase") == "Running")
    with urllib.request.urlopen(f"http://{ip}:9090/metrics", timeout=10) as response:
        return str(response.read().decode())


def gauge(text: str, name: str, **labels: str) -> float | None:
    """One sample of the exposition text whose labels include `labels`."""
    for line in text.splitlines():
        found = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if found and all(f'{k}="{v}"' in found.group(1) for k, v in labels.items()):
            return float(found.group(2))
    return None


def evaluation_files(s3_client: Any, stage_uri: str) -> dict[int, dict[str, Any]]:
    """The stage's result files, <stage uri>/evaluation/step-<N>.json, by step."""
    bucket, _, prefix = stage_uri.removeprefix("s3://").partition("/")
    found = {}
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/evaluation/")
    for item in listed.get("Contents", []):
        step = re.fullmatch(rf"{re.escape(prefix)}/evaluation/step-(\d+)\.json", item["Key"])
        if step:
            body = s3_client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            found[int(step.group(1))] = json.loads(body)
    return found


# Three trainer starts, each with its colocated vLLM engine (measured 30-40 s to start in a
# pod on a loaded 2-core machine, most of it vLLM inspecting the model class in a fresh
# HOME), plus two stages of steps: more than the suite's default 600 s.
@pytest.mark.timeout(1200)
def test_fre_then_mgt_with_a_killed_trainer_resuming(
    testbed: TestBedState, s3_client: Any, seeded: dict[str, str]
) -> None:
    try:
        driver.install_operator(
            testbed, namespace=NAMESPACE, release="e2e", watch_namespaces=[NAMESPACE]
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
        stage["evaluation"]["everySteps"] = 4  # FRE: 0, 4, 8, 10; MGT: 0, 4, 6
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

    # Mid-stage: the baseline and a middle evaluation are in the status and the metrics.
    (middle,) = seen["stages"][0]["evaluation"]
    assert middle["dataset"] == "arithmetic" and middle["baseline"]["step"] == 0, middle
    assert middle["latest"]["step"] in (4, 8) and middle["latest"]["prompts"] == 16, middle
    fre_labels = {"namespace": NAMESPACE, "run": "tiny", "stage": "fre", "dataset": "arithmetic"}

    def middle_scraped() -> str | None:
        text = operator_metrics(testbed)
        step = gauge(text, "lmmr1_evaluation_step", **fre_labels, point="latest")
        return text if step is not None and step >= 4 else None

    scraped = wait_for(
        "the middle evaluation in the operator's metrics",
        middle_scraped,
        timeout=60,
        state=testbed,
        namespace=NAMESPACE,
    )
    baseline = gauge(scraped, "lmmr1_evaluation_accuracy", **fre_labels, point="baseline")
    assert baseline == pytest.approx(middle["baseline"]["accuracy"])

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
    check_evaluation(testbed, s3_client, status, logs)
    for final in (fre["finalCheckpoint"], mgt["finalCheckpoint"]):
        bucket, _, prefix = final.removeprefix("s3://").partition("/")
        manifest = s3_client.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")
        files = json.loads(manifest["Body"].read())["files"]
        assert any(f["path"].endswith("model.safetensors") for f in files)
    check_tracking(testbed, s3_client, fre["finalCheckpoint"].rsplit("/fre/", 1)[0])


def check_evaluation(
    testbed: TestBedState, s3_client: Any, status: dict[str, Any], logs: str
) -> None:
    """Each stage's baseline, middle and final results: in S3 beside the checkpoints they
    measured (read back), in the status with the gain, in the operator's metrics."""
    metrics = operator_metrics(testbed)
    for record, dataset, steps, start in (
        (status["stages"][0], "arithmetic", [0, 4, 8, 10], "s3://lmmr1-demo/models/tiny-qwen25vl"),
        (status["stages"][1], "counting", [0, 4, 6], status["stages"][0]["finalCheckpoint"]),
    ):
        stage_uri = record["finalCheckpoint"].rsplit("/step-", 1)[0]
        files = evaluation_files(s3_client, stage_uri)
        assert sorted(files) == steps, (record["name"], sorted(files))
        assert files[0]["weights"] == start  # the baseline measured the stage's start
        assert files[4]["checkpoint"] == f"{stage_uri}/step-4"  # pruned since; its result stays
        assert files[steps[-1]]["checkpoint"] == record["finalCheckpoint"]
        for step, body in files.items():
            entry = body["datasets"][dataset]
            assert body["step"] == step and entry["rows"] == 16, body
            assert entry["metrics"]["prompts"] == 16 and entry["metrics"]["k"] == 1
            assert body["settings"] == {"samples_per_prompt": 1, "temperature": 0.0, "top_p": 1.0}
        (entry,) = record["evaluation"]
        assert entry["dataset"] == dataset
        baseline, final = files[0]["datasets"][dataset], files[steps[-1]]["datasets"][dataset]
        assert entry["baseline"]["accuracy"] == pytest.approx(baseline["metrics"]["accuracy"])
        assert entry["final"]["step"] == steps[-1] == entry["latest"]["step"]
        assert entry["final"]["accuracy"] == pytest.approx(final["metrics"]["accuracy"])
        gain = final["metrics"]["accuracy"] - baseline["metrics"]["accuracy"]
        assert entry["gain"] == pytest.approx(gain)
        labels = {
            "namespace": NAMESPACE,
            "run": "tiny",
            "stage": record["name"],
            "dataset": dataset,
        }
        for point, expected in (("baseline", baseline), ("final", final)):
            value = gauge(metrics, "lmmr1_evaluation_accuracy", **labels, point=point)
            assert value == pytest.approx(expected["metrics"]["accuracy"]), (point, metrics[-2000:])
        assert gauge(metrics, "lmmr1_evaluation_gain", **labels) == pytest.approx(gain)
    # Measured once per stage: the restarted FRE trainer read its baseline back from S3.
    assert len(re.findall(r"evaluation at step 0 \(", logs)) == 2, logs[-3000:]
    records = [json.loads(line.split("lmmr1-train step ", 1)[1]) for line in logs.splitlines()
               if "lmmr1-train step {" in line]  # fmt: skip
    assert any("eval_seconds" in r and r["step"] == 4 for r in records)
    assert any("baseline_eval_seconds" in r for r in records)


def check_tracking(testbed: TestBedState, s3_client: Any, run_uri: str) -> None:
    """Both stages' steps reached MLflow (one MLflow run per stage, the killed and the
    resumed attempt of FRE in one), TensorBoard (a file per attempt, each step once) and W&B
    (an offline run directory per attempt, one run id), all from the pods."""
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
    # Each evaluation a trainer measured (a result read back from S3 is not logged again).
    for stage, dataset, steps in (
        ("fre", "arithmetic", [0, 4, 8, 10]),
        ("mgt", "counting", [0, 4, 6]),
    ):
        history = client.get_metric_history(runs[stage].info.run_id, f"eval/{dataset}/accuracy")
        assert sorted(m.step for m in history) == steps, (stage, history)
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
    assert len({run.rsplit("-", 1)[1] for run in runs_logged}) == 1, runs_logged  # one run id
