"""Running the real trainer (`python -m lmmr1_trainer.train`) as a subprocess in tests: the
stage config a test starts from, the process with CPU settings, and its step log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from lmmr1_trainer.localrun import CPU_ENV, Service, start_rollout
from lmmr1_trainer.train import step_records

TRAIN_MODULE = ["-m", "lmmr1_trainer.train"]
# The trainer with the sign of every advantage flipped: the negative control of the
# learning test (`python tests/flipped_advantages.py --config …`).
FLIPPED_TRAINER = [str(Path(__file__).with_name("flipped_advantages.py"))]


def stage_config(
    *,
    init_from: str,
    dataset: dict[str, Any],
    checkpoint_uri: str,
    rollout_urls: list[str],
    reward_url: str,
    token_file: Path,
    s3_endpoint: str | None = None,
    stage: str = "mgt",
    **algorithm: Any,
) -> dict[str, Any]:
    """A small CPU stage (ZeRO-2, fp32, transformers rollout); `algorithm` overrides."""
    return {
        "run": {"namespace": "ns", "name": "tiny", "stage": stage, "stage_index": 1},
        "init_from": init_from,
        "dataset": dataset,
        "algorithm": {
            "samples_per_prompt": 4,
            "rollout_batch_size": 2,
            "train_batch_size": 4,
            "micro_train_batch_size": 2,
            "epochs_per_rollout": 1,
            "learning_rate": 1e-3,
            "max_generation_length": 24,
            "zero_stage": 2,
            "bf16": False,
            "gradient_checkpointing": True,
            "kl_coef": 0.001,
            **algorithm,
        },
        "reward": {"url": reward_url},
        "rollout": {"urls": rollout_urls, "backend": "transformers", "token_file": str(token_file)},
        "trainer": {"nodes": 1, "gpus_per_node": 0},
        "checkpoint": {"uri": checkpoint_uri, "every_steps": 1, "keep_last": 2},
        "progress": {"configmap": "tiny-progress", "namespace": "ns"},
        "s3": {"endpoint": s3_endpoint},
    }


def write_token(directory: Path) -> Path:
    """The rollout servers' weight-update token, as the operator mounts it."""
    token = directory / "token"
    token.write_text("t0ken\n")
    return token


def write_stage(path: Path, stage: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(stage))
    return path


@contextmanager
def rollout_server(
    stage: dict[str, Any], workdir: Path, env: dict[str, str] | None = None
) -> Iterator[Service]:
    """A transformers rollout server serving `stage`'s `init_from`, stopped on exit. Every
    trainer pushes its weights when it starts, so consecutive runs can share one server."""
    config = write_stage(workdir / "rollout-stage.yaml", stage)
    service = start_rollout(
        config,
        Path(stage["rollout"]["token_file"]),
        env={**(env or {}), "LMMR1_MODEL_CACHE": str(workdir / "rollout-models")},
    )
    try:
        yield service
    finally:
        service.stop()


def trainer_env(workdir: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        **CPU_ENV,
        **(env or {}),
        "LMMR1_TORCH_THREADS": "1",
        "LMMR1_PROGRESS_FILE": str(workdir / "progress.json"),
        "LMMR1_TERMINATION_LOG": str(workdir / "termination-log"),
        "LMMR1_MODEL_CACHE": str(workdir / "models"),
        "LMMR1_WORKDIR": str(workdir),
    }


def start_trainer(
    config: Path,
    workdir: Path,
    env: dict[str, str] | None = None,
    program: list[str] = TRAIN_MODULE,
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *program, "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=trainer_env(workdir, env),
    )


def run_trainer(
    config: Path,
    workdir: Path,
    env: dict[str, str] | None = None,
    program: list[str] = TRAIN_MODULE,
    timeout_s: float = 400,
) -> list[dict[str, Any]]:
    """Run the stage to the end; its step records. Fails with the log's tail otherwise."""
    process = start_trainer(config, workdir, env, program)
    out, _ = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, out[-4000:]
    return step_records(out.splitlines())


def run_until_killed(
    config: Path, workdir: Path, kill_after_step: int, env: dict[str, str] | None = None
) -> list[str]:
    """Run the stage and SIGKILL it (no clean-up) once step `kill_after_step` is logged,
    i.e. after that step's checkpoint, when it has one, is committed. Its output lines."""
    process = start_trainer(config, workdir, env)
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line)
        records = step_records([line])
        if records and records[0]["step"] == kill_after_step:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "".join(lines[-30:])
    return lines
