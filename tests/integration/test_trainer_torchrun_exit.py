"""`python -m lmmr1_trainer.launch` with real torchrun ranks (gloo, CPU): a rank's
configuration error ends the launch with exit 78 and that rank's message in the
termination message file, where torchrun alone would exit 1. No Kubernetes test bed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from lmmr1_trainer.config import EXIT_CONFIG_ERROR
from lmmr1_trainer.launch import EXIT_DIR_ENV, TERMINATION_LOG_ENV

WORKER = """
import sys, time
import torch.distributed as dist
from lmmr1_trainer.launch import config_error
dist.init_process_group("gloo")
rank = dist.get_rank()
dist.barrier()
if rank == 1:
    {failure}
time.sleep(120)  # rank 0 waits for rank 1 forever: torchrun stops it when rank 1 fails
"""


def launch(tmp_path: Path, *program: str) -> tuple[subprocess.CompletedProcess[str], str]:
    log = tmp_path / "termination-log"
    log.write_text("")
    env = {**os.environ, TERMINATION_LOG_ENV: str(log), "OMP_NUM_THREADS": "1"}
    env.pop(EXIT_DIR_ENV, None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmmr1_trainer.launch",
            "--standalone",
            "--nproc-per-node=2",
            *program,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, log.read_text()


def worker(tmp_path: Path, failure: str) -> str:
    path = tmp_path / "worker.py"
    path.write_text(textwrap.dedent(WORKER).format(failure=failure))
    return str(path)


def test_a_ranks_config_error_ends_the_launch_with_78_and_its_message(tmp_path: Path) -> None:
    result, message = launch(
        tmp_path,
        worker(tmp_path, 'sys.exit(config_error("dataset.uri: s3://b/fre.jsonl does not exist"))'),
    )
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr[-3000:]
    assert message == "rank 1: dataset.uri: s3://b/fre.jsonl does not exist"


def test_a_rank_exiting_78_without_a_word_still_ends_the_launch_with_78(tmp_path: Path) -> None:
    result, message = launch(tmp_path, worker(tmp_path, "sys.exit(78)"))
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr[-3000:]
    assert message == "rank 1 exited 78 (configuration error); see its log"


def test_other_failures_exit_as_torchrun_does(tmp_path: Path) -> None:
    result, message = launch(tmp_path, worker(tmp_path, "sys.exit(3)"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert message == ""


def test_the_trainer_under_the_launcher_reports_a_bad_stage_config(tmp_path: Path) -> None:
    """The pod's own command for a multi-GPU stage, on CPU: batch sizes that do not divide
    fail every rank before training starts."""
    stage = {
        "run": {"namespace": "ns", "name": "r", "stage": "fre", "stage_index": 0},
        "init_from": "/nonexistent/model",
        "dataset": {"uri": "/nonexistent/train.jsonl", "type": "text"},
        "reward": {"url": "http://127.0.0.1:1"},
        "trainer": {"gpus_per_node": 0},
        "algorithm": {"train_batch_size": 10, "micro_train_batch_size": 4},
        "checkpoint": {"uri": str(tmp_path / "ckpt")},
        "progress": {"configmap": "c", "namespace": "ns"},
    }
    config = tmp_path / "stage.yaml"
    config.write_text(yaml.safe_dump(stage))
    result, message = launch(tmp_path, "-m", "lmmr1_trainer.train", "--config", str(config))
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr[-3000:]
    # Both ranks fail on the same setting; whichever reports first stops the other, so the
    # message names either rank (CI saw rank 1 win the race once).
    expected = r"rank [01]: stage config: algorithm\.train_batch_size .*"
    assert re.fullmatch(expected, message), message
    assert "micro_train_batch_size" in message
