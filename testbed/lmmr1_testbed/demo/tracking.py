"""The demo's experiment tracking: TensorBoard (event files beside the checkpoints in S3) and
MLflow (the test bed's tracking server), and where their data went at the end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmmr1_testbed.layout import TestBedState


def tracking_spec(state: TestBedState) -> dict[str, Any]:
    """`spec.tracking` for the demo's run. The pods run on the process node, on this
    machine, so the test bed's loopback MLflow URL reaches them as it is."""
    return {
        "tensorboard": {"enabled": True},
        "mlflow": {"trackingUri": state.mlflow_url},
        "logSamplesEverySteps": 4,
    }


def _bucket_and_prefix(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def tracking_summary(
    state: TestBedState,
    s3: Any,
    run: dict[str, Any],
    namespace: str,
    say: Callable[[str], None] = print,
) -> None:
    """Where the run's tracking data went: its TensorBoard event files in S3 (by stage) and
    its MLflow experiment, with each stage's run and how many steps it logged."""
    name = run["metadata"]["name"]
    bucket, prefix = _bucket_and_prefix(run["spec"]["storage"]["uri"])
    tensorboard = "/".join(
        p for p in (prefix, namespace, name, run["metadata"]["uid"], "tensorboard") if p
    )
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=tensorboard + "/")
    files: dict[str, int] = {}
    for item in listed.get("Contents", []):
        stage = item["Key"][len(tensorboard) + 1 :].split("/", 1)[0]
        files[stage] = files.get(stage, 0) + 1
    say(f"   tensorboard: s3://{bucket}/{tensorboard}/ ({files or 'no event files'})")
    say(f"        view: tensorboard --logdir s3://{bucket}/{tensorboard} (source .testbed/s3.env)")
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=state.mlflow_url)
        experiment = client.get_experiment_by_name(f"{namespace}/{name}")
        if experiment is None:
            say(f"   mlflow: no experiment {namespace}/{name} at {state.mlflow_url}")
            return
        say(f"   mlflow: {state.mlflow_url}/#/experiments/{experiment.experiment_id}")
        for found in client.search_runs([experiment.experiment_id]):
            steps = client.get_metric_history(found.info.run_id, "train/reward")
            tables = client.list_artifacts(found.info.run_id, "samples")
            say(
                f"        {found.info.run_name}: run {found.info.run_id}, {found.info.status}, "
                f"{len(steps)} steps of metrics, {len(tables)} samples tables"
            )
    except Exception as err:  # the summary must not fail a demo that trained
        say(f"   mlflow: could not read {state.mlflow_url}: {err}")
