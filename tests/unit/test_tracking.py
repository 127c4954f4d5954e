"""Experiment tracking: the run's `tracking` section, what the operator renders from it (the
stage config, the trainer's env with secrets by reference only), and the tracker itself on
its real local back ends (tensorboardX event files read back by TensorBoard's own reader,
a W&B offline run read back from its record log)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from tests.stage_contexts import run_object, stage_context
from tests.wandb_offline import history

from lmmr1_operator.api import crd
from lmmr1_operator.api.spec import LMMR1RunSpec
from lmmr1_operator.children import stage_config, trainer
from lmmr1_trainer.config import (
    CheckpointConfig,
    DatasetConfig,
    MlflowConfig,
    ProgressConfig,
    RewardConfig,
    RunRef,
    StageConfig,
    TensorBoardConfig,
    TrackingConfig,
    WandbConfig,
)
from lmmr1_trainer.tracking import Sample, Tracker, TrackingConfigError, step_metrics
from lmmr1_trainer.tracking.backends import MlflowBackend

TRACKING = {
    "tensorboard": {"enabled": True},
    "mlflow": {"trackingUri": "http://mlflow.mlflow.svc:5000", "credentialsSecret": "mlflow-cred"},
    "wandb": {"project": "lmmr1", "entity": "team", "apiKeySecret": "wandb-key"},
    "logSamplesEverySteps": 5,
}


def _trainer_container(run: dict[str, Any]) -> dict[str, Any]:
    pod = trainer.job(stage_context(run))["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return dict(container)


def test_a_run_without_tracking_tracks_nothing() -> None:
    rendered = stage_config.render(stage_context(run_object()), [])
    assert not rendered.tracking.enabled
    env = {e["name"] for e in _trainer_container(run_object())["env"]}
    assert not env & {"MLFLOW_TRACKING_TOKEN", "WANDB_API_KEY"}


def test_the_stage_config_says_where_tracking_goes_and_holds_no_secret() -> None:
    run = run_object(tracking=TRACKING)
    ctx = stage_context(run, index=1, finals=["s3://bucket/ckpt/ns/r/uid-1/fre/step-9"])
    tracking = stage_config.render(ctx, []).tracking
    assert tracking.tensorboard == TensorBoardConfig(
        uri="s3://bucket/ckpt/ns/r/uid-1/tensorboard/mgt"
    )
    # Beside the stage's checkpoints (s3://bucket/ckpt/ns/r/uid-1/mgt), per run and stage.
    assert ctx.checkpoint_uri == "s3://bucket/ckpt/ns/r/uid-1/mgt"
    assert tracking.mlflow == MlflowConfig(
        tracking_uri="http://mlflow.mlflow.svc:5000", experiment="ns/r"
    )
    assert tracking.wandb == WandbConfig(project="lmmr1", entity="team", mode="online", uri=None)
    assert tracking.log_samples_every_steps == 5
    configmap = stage_config.configmap(ctx, None)["data"]["stage.yaml"]
    assert "mlflow-cred" not in configmap and "wandb-key" not in configmap
    assert "tracking_uri: http://mlflow.mlflow.svc:5000" in configmap
    assert StageConfig.model_validate(yaml.safe_load(configmap)).tracking == tracking


def test_offline_wandb_goes_beside_the_checkpoints_and_needs_no_key() -> None:
    run = run_object(tracking={"wandb": {"project": "lmmr1", "mode": "offline"}})
    tracking = stage_config.render(stage_context(run), []).tracking
    assert (
        tracking.wandb is not None and tracking.wandb.uri == "s3://bucket/ckpt/ns/r/uid-1/wandb/fre"
    )
    assert tracking.mlflow is None and tracking.tensorboard is None
    assert "WANDB_API_KEY" not in {e["name"] for e in _trainer_container(run)["env"]}


def test_credentials_reach_the_trainer_only_by_secret_reference() -> None:
    env = {e["name"]: e for e in _trainer_container(run_object(tracking=TRACKING))["env"]}
    for key in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        # Either a token or a user and password: each key may be absent from the Secret.
        assert env[key] == {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": "mlflow-cred", "key": key, "optional": True}},
        }
    assert env["WANDB_API_KEY"] == {
        "name": "WANDB_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "wandb-key", "key": "WANDB_API_KEY"}},
    }
    assert all("value" not in e for k, e in env.items() if k.startswith(("MLFLOW", "WANDB_API")))


def test_the_experiment_name_can_be_set() -> None:
    run = run_object(tracking={"mlflow": {"trackingUri": "https://m.example", "experiment": "lmm"}})
    mlflow = stage_config.render(stage_context(run), []).tracking.mlflow
    assert mlflow is not None and mlflow.experiment == "lmm"


def test_the_crd_documents_and_validates_the_tracking_section() -> None:
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    tracking = schema["properties"]["spec"]["properties"]["tracking"]
    assert set(tracking["properties"]) == {
        "tensorboard",
        "mlflow",
        "wandb",
        "logSamplesEverySteps",
    }
    wandb = tracking["properties"]["wandb"]
    (rule,) = wandb["x-kubernetes-validations"]
    assert rule["fieldPath"] == ".apiKeySecret" and "offline" in rule["message"]
    assert "WANDB_API_KEY" in wandb["properties"]["apiKeySecret"]["description"]
    docs = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    for field in ("logSamplesEverySteps", "trackingUri", "apiKeySecret", "credentialsSecret"):
        assert field in docs, field
    assert "MLFLOW_TRACKING_TOKEN" in docs and "tensorboard --logdir" in docs


def test_an_offline_wandb_run_needs_no_key_but_an_online_one_does() -> None:
    spec = run_object(tracking={"wandb": {"project": "p", "mode": "offline"}})["spec"]
    assert LMMR1RunSpec.model_validate(spec).tracking is not None
    with pytest.raises(ValidationError, match="apiKeySecret: online mode needs apiKeySecret"):
        LMMR1RunSpec.model_validate(run_object(tracking={"wandb": {"project": "p"}})["spec"])


# -- the tracker on its local back ends --------------------------------------------------


def _stage(tmp_path: Path, tracking: TrackingConfig) -> StageConfig:
    return StageConfig(
        run=RunRef(namespace="ns", name="tiny", uid="u-1", stage="fre", stage_index=0),
        init_from=str(tmp_path / "model"),
        dataset=DatasetConfig(uri=str(tmp_path / "data"), type="text"),
        reward=RewardConfig(url="http://127.0.0.1:1", accuracy_weight=2.0),
        checkpoint=CheckpointConfig(uri=str(tmp_path / "ckpt")),
        progress=ProgressConfig(configmap="p", namespace="ns"),
        tracking=tracking,
    )


def _record(step: int) -> dict[str, Any]:
    return {
        "step": step,
        "total_steps": 3,
        "rows": [0, 1],
        "reward": 0.25 * step,
        "accuracy": 0.1 * step,
        "format_reward": 0.5,
        "kl": 0.01,
        "entropy": 1.5,
        "lr": 1e-4,
        "update_seconds": 2.0,
        "seconds": 3.0,
    }


def test_step_metrics_group_measurements_and_derive_the_accuracy_reward() -> None:
    metrics = step_metrics(_record(2), accuracy_weight=2.0)
    assert metrics["train/reward"] == 0.5 and metrics["train/accuracy"] == pytest.approx(0.2)
    assert metrics["train/accuracy_reward"] == pytest.approx(0.4)
    assert metrics["time/update_seconds"] == 2.0 and metrics["time/seconds"] == 3.0
    assert not {"train/step", "train/rows", "train/total_steps"} & set(metrics)


def test_tensorboard_and_offline_wandb_hold_what_was_logged(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracking = TrackingConfig(
        tensorboard=TensorBoardConfig(uri=str(tmp_path / "store" / "tensorboard")),
        wandb=WandbConfig(project="p", mode="offline", uri=str(tmp_path / "store" / "wandb")),
        log_samples_every_steps=2,
    )
    tracker = Tracker.create(_stage(tmp_path, tracking), tmp_path / "work")
    assert tracker is not None
    for step in (1, 2, 3):
        tracker.log_step(step, _record(step))
        if tracker.samples_due(step):
            tracker.log_samples(step, [Sample("what is 1+1?", "<answer>2</answer>", 1.5, 1.0)])
    tracker.log_evaluation(3, {"mathvista": {"accuracy": 0.4}, "geo3k": {"accuracy": 0.3}})
    tracker.close()
    assert tracker.failures == {"tensorboard": 0, "wandb": 0}

    events = EventAccumulator(str(tmp_path / "store" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    rewards = [(e.step, e.value) for e in events.Scalars("train/reward")]
    assert rewards == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert [e.value for e in events.Scalars("eval/mathvista/accuracy")] == [pytest.approx(0.4)]
    assert [e.step for e in events.Scalars("train/entropy")] == [1, 2, 3]

    (run_file,) = (tmp_path / "store" / "wandb").glob("offline-run-*/run-*.wandb")
    logged = history(run_file)
    steps = [row["_step"] for row in logged]
    assert steps == [1, 2, 3]
    assert [row["train/reward"] for row in logged] == [0.25, 0.5, 0.75]
    assert logged[2]["eval/geo3k/accuracy"] == 0.3
    assert logged[1]["samples/_type"] == "table-file" and logged[1]["samples/nrows"] == 1
    (table,) = run_file.parent.glob("files/media/table/samples_2_*.table.json")
    assert json.loads(table.read_text())["data"] == [
        [2, "what is 1+1?", "<answer>2</answer>", 1.5, 1.0]
    ]


def test_a_down_tracking_server_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing listens on port 1: every call fails fast; the tracker pauses the back end
    after a failure (calls in the pause are skipped and counted), and tries again after."""
    mlflow = MlflowConfig(tracking_uri="http://127.0.0.1:1", experiment="e")
    tracking = TrackingConfig(mlflow=mlflow)
    backend = MlflowBackend(mlflow, _stage(tmp_path, tracking).run, {})
    with caplog.at_level(logging.WARNING, logger="lmmr1_trainer.tracking"):
        tracker = Tracker(tracking, [backend], pause_s=3600)
        tracker.log_step(1, _record(1))
        tracker.log_step(2, _record(2))
        assert tracker.failures == {"mlflow": 1}
        assert tracker.slots[0].dropped == 2
        tracker.slots[0].paused_until = 0.0  # the pause is over
        tracker.log_step(3, _record(3))
        assert tracker.failures == {"mlflow": 2}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("mlflow start failed (failure 1; training goes on" in w for w in warnings)


def test_an_unusable_tensorboard_uri_is_a_configuration_error(tmp_path: Path) -> None:
    tracking = TrackingConfig(tensorboard=TensorBoardConfig(uri="s3:///no-bucket"))
    with pytest.raises(TrackingConfigError, match=r"tracking.tensorboard.uri: s3:///no-bucket"):
        Tracker.create(_stage(tmp_path, tracking), tmp_path / "work")
