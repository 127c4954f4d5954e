"""The real trainer (tiny model, CPU, colocated vLLM) tracking its steps in TensorBoard, the
test bed's MLflow server and W&B (offline), read back with other readers than the writers:
TensorBoard's EventAccumulator for tensorboardX's files, MLflow's REST API through its
client, W&B's record log parsed by tests/wandb_offline.py. The run is killed after a
checkpoint and resumed, as a restarted pod would: the same MLflow run continues, TensorBoard
merges the two attempts' files, and no step is lost or logged twice. And a tracking server
that is down costs warnings, never the stage."""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wandb
from tests.trainer_harness import (
    build_tiny_model,
    free_port,
    run_trainer_output,
    run_until_killed,
    stage_config,
    synthetic_dataset,
    write_stage,
    write_token,
)
from tests.wandb_offline import history

from lmmr1_testbed.layout import TestBedState
from lmmr1_trainer.localrun import Service, start_verifier
from lmmr1_trainer.train import step_records

STEPS = 3
KILL_AFTER_STEP = 2  # its checkpoint (every 2 steps) is committed when its line is out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vl"))


@pytest.fixture(scope="module")
def verifier() -> Iterator[Service]:
    service = start_verifier()
    yield service
    service.stop()


def _stage(model: Path, verifier: Service, tmp_path: Path, tracking: dict[str, Any]) -> Path:
    data = synthetic_dataset(tmp_path / "data", "arithmetic", 4)
    stage = stage_config(
        init_from=str(model),
        dataset={"uri": str(data), "type": "text"},
        checkpoint_uri=str(tmp_path / "store" / "ckpt"),
        rollout_urls=[],
        reward_url=verifier.url,
        token_file=write_token(tmp_path),
        stage="fre",
        max_steps=STEPS,
    )
    stage["run"]["uid"] = secrets.token_hex(4)
    stage["checkpoint"]["every_steps"] = 2
    stage["tracking"] = tracking
    return write_stage(tmp_path / "stage.yaml", stage)


@pytest.fixture
def wandb_service_in_this_process() -> Iterator[None]:
    """A wandb service in the test process, as `wandb.setup()` in a launcher (or an earlier
    in-process test) leaves one: its WANDB_SERVICE reaches the trainers' environment, and
    each trainer must still log through a core of its own (else the resumed attempt logged
    nothing: the killed attempt's run stayed open in the shared core)."""
    wandb.setup().ensure_service()
    yield
    wandb.teardown()


@pytest.mark.usefixtures("wandb_service_in_this_process")
def test_a_resumed_stage_tracks_every_step_once_in_tensorboard_mlflow_and_wandb(
    testbed: TestBedState, tiny_model: Path, verifier: Service, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    experiment = f"ns/tiny-{secrets.token_hex(3)}"
    store = tmp_path / "store"
    config = _stage(
        tiny_model,
        verifier,
        tmp_path,
        {
            "tensorboard": {"uri": str(store / "tensorboard" / "fre")},
            "mlflow": {"tracking_uri": testbed.mlflow_url, "experiment": experiment},
            "wandb": {"project": "lmmr1-test", "mode": "offline", "uri": str(store / "wandb")},
            "log_samples_every_steps": 2,
            "samples_per_table": 3,
        },
    )
    env = {"WANDB_MODE": "offline"}
    assert os.environ.get("WANDB_SERVICE")  # see `wandb_service_in_this_process`
    (tmp_path / "run").mkdir()
    first = step_records(run_until_killed(config, tmp_path / "run", KILL_AFTER_STEP, env))
    lines = run_trainer_output(config, tmp_path / "run", env)
    second = step_records(lines)
    records = {r["step"]: r for r in first + second}
    assert [r["step"] for r in second] == [3]  # resumed from step 2's checkpoint
    assert sorted(records) == [1, 2, 3]
    # The entropy estimate (mean -log p of the sampled tokens) is in every step record.
    assert all(math.isfinite(r["entropy"]) and r["entropy"] > 0 for r in records.values())
    assert any("tracking: mlflow run " in line for line in lines), lines[-20:]

    # MLflow, over its REST API: one run for the stage, both attempts' steps in it, once.
    client = MlflowClient(tracking_uri=testbed.mlflow_url)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    (run,) = client.search_runs([found.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "fre"
    for key, field in (("train/reward", "reward"), ("train/entropy", "entropy")):
        history_ = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history_] == [
            (step, pytest.approx(records[step][field])) for step in (1, 2, 3)
        ], key
    for key in (
        "train/kl",
        "train/lr",
        "train/format_reward",
        "train/accuracy_reward",
        "train/response_length",
        "time/update_seconds",
        "time/rollout_seconds",
    ):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3]
    params = run.data.params
    assert params["algorithm.learning_rate"] == "0.001"
    assert params["algorithm.samples_per_prompt"] == "4" and params["stage"] == "fre"
    (artifact,) = client.list_artifacts(run.info.run_id, "samples")
    assert artifact.path == "samples/step-000002.json"
    table = json.loads(Path(client.download_artifacts(run.info.run_id, artifact.path)).read_text())
    assert table["columns"] == ["step", "prompt", "response", "reward", "accuracy"]
    assert len(table["data"]) == 3 and all(row[0] == 2 and row[1] for row in table["data"])

    # TensorBoard: one event file per attempt, merged into steps 1..3, each once.
    event_files = sorted((store / "tensorboard" / "fre").glob("events.out.tfevents.*"))
    assert len(event_files) == 2, event_files
    events = EventAccumulator(str(store / "tensorboard" / "fre"), size_guidance={"scalars": 0})
    events.Reload()
    rewards = [(e.step, e.value) for e in events.Scalars("train/reward")]
    assert rewards == [(s, pytest.approx(records[s]["reward"], abs=1e-6)) for s in (1, 2, 3)]
    assert "samples/text_summary" in events.Tags()["tensors"]  # the samples table

    # W&B offline: one run id, a run directory per attempt (uploaded at its checkpoints and
    # at the end). What wandb's core had not yet written to disk when the killed attempt
    # uploaded its directory is not there (measured: nothing of steps 1-2): offline W&B
    # keeps what a finished attempt logged; a killed one's steps are in TensorBoard/MLflow.
    run_files = sorted((store / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2 and len({f.name for f in run_files}) == 1, run_files
    wandb_id = run_files[-1].stem.removeprefix("run-")
    assert any(f"wandb offline run {wandb_id} in " in line for line in lines), lines[-20:]
    resumed = history(run_files[-1])  # named by its start time: the resumed attempt's
    assert [(row["_step"], row["train/reward"]) for row in resumed] == [
        (3, pytest.approx(records[3]["reward"]))
    ]
    logged = [row["_step"] for f in run_files for row in history(f)]
    assert len(logged) == len(set(logged)) and set(logged) <= {1, 2, 3}, logged


def test_a_tracking_server_that_is_down_does_not_stop_training(
    tiny_model: Path, verifier: Service, tmp_path: Path
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = _stage(
        tiny_model,
        verifier,
        tmp_path,
        {"mlflow": {"tracking_uri": down, "experiment": "ns/tiny"}, "log_samples_every_steps": 1},
    )
    (tmp_path / "run").mkdir()
    lines = run_trainer_output(config, tmp_path / "run")
    assert [r["step"] for r in step_records(lines)] == [1, 2, 3]
    text = "\n".join(lines)
    assert "tracking: mlflow start failed (failure 1; training goes on" in text
    assert "tracking: mlflow failed" in text and "skipped" in text
