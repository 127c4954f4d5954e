"""Checkpoint staging room: the estimate per node, the pods' scratch volume sized by
`resources.trainer.scratchSize`, and the trainer failing at start (exit 78, naming the field)
when the volume cannot hold a checkpoint, instead of at the first checkpoint hours in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from tests.stage_contexts import run_object, stage_context

from lmmr1_operator.api.spec import DEFAULT_SCRATCH_SIZE
from lmmr1_operator.children import stage_config, trainer
from lmmr1_operator.quantity import quantity_bytes, quantity_value
from lmmr1_trainer.config import EXIT_CONFIG_ERROR
from lmmr1_trainer.localrun import CPU_ENV
from lmmr1_trainer.scratch import GIB, Layout, checkpoint_bytes, shortfall
from lmmr1_trainer.synthetic import write_dataset
from lmmr1_trainer.tiny_model import build_tiny_model

# Qwen2.5-VL-3B-Instruct (bench/lmmr1_bench/gpu.py checks this count against its config).
QWEN25VL_3B_PARAMETERS = 3_754_622_976
ONE_NODE_OF_8 = Layout(world_size=8, ranks_on_node=8, first_node=True, zero_stage=3, weight_bytes=2)


def test_a_3b_checkpoint_on_one_8_gpu_node_is_about_60_gb() -> None:
    # 12 bytes of optimizer state + 2 of bf16 weights per parameter, all eight shards on
    # this node, plus the 7.5 GB Hugging Face folder.
    size = checkpoint_bytes(QWEN25VL_3B_PARAMETERS, ONE_NODE_OF_8)
    assert size == 16 * QWEN25VL_3B_PARAMETERS
    assert 59e9 < size < 61e9


def test_the_default_scratch_holds_two_copies_of_the_papers_model_with_a_critic() -> None:
    with_critic = checkpoint_bytes(QWEN25VL_3B_PARAMETERS, ONE_NODE_OF_8, models=2)
    assert 2 * with_critic <= quantity_bytes(DEFAULT_SCRATCH_SIZE)


def test_shards_split_across_nodes_and_only_node_0_writes_the_model_folder() -> None:
    second_of_two = Layout(
        world_size=16, ranks_on_node=8, first_node=False, zero_stage=3, weight_bytes=2
    )
    assert checkpoint_bytes(1000, second_of_two) == 14 * 1000 // 2
    unpartitioned = Layout(
        world_size=16, ranks_on_node=8, first_node=False, zero_stage=0, weight_bytes=4
    )
    assert checkpoint_bytes(1000, unpartitioned) == 0


def test_shortfall_names_the_field_and_counts_what_the_volume_already_holds(
    tmp_path: Path,
) -> None:
    (tmp_path / "left-over").write_bytes(b"x" * 4096)
    assert shortfall(tmp_path, 1000, limit_bytes=6096) is None  # 2 x 1000 <= 6096 - 4096
    problem = shortfall(tmp_path, 1001, limit_bytes=6096)
    assert problem is not None and "resources.trainer.scratchSize" in problem


def test_quantities_read_as_kubernetes_does() -> None:
    assert quantity_bytes("256Gi") == 256 * 1024**3
    assert quantity_bytes("1.5Ki") == 1536
    assert quantity_bytes("2k") == 2000
    assert quantity_bytes("1e3") == 1000
    assert quantity_value("500m") == quantity_value("0.5")


def test_the_trainer_pod_gets_a_sized_scratch_volume_and_requests_the_disk() -> None:
    run = run_object()
    run["spec"]["stages"][0].setdefault("resources", {})["trainer"] = {"scratchSize": "300Gi"}
    ctx = stage_context(run)
    pod = trainer.job(ctx)["spec"]["template"]["spec"]
    scratch = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert scratch["emptyDir"] == {"sizeLimit": "300Gi"}
    container = pod["containers"][0]
    assert container["resources"]["requests"]["ephemeral-storage"] == "300Gi"
    assert stage_config.render(ctx, []).trainer.scratch_bytes == 300 * GIB


def test_a_scratch_volume_too_small_for_a_checkpoint_fails_the_stage_at_start(
    tmp_path: Path,
) -> None:
    model = build_tiny_model(tmp_path / "model", text_only=True)
    dataset = write_dataset("arithmetic", 8, 0, str(tmp_path / "data"))
    config = {
        "run": {"namespace": "ns", "name": "r", "stage": "fre", "stage_index": 0},
        "init_from": str(model),
        "dataset": {"uri": dataset, "type": "text"},
        "algorithm": {
            "samples_per_prompt": 2,
            "rollout_batch_size": 2,
            "train_batch_size": 4,
            "zero_stage": 2,
            "bf16": False,
            "kl_coef": 0.0,
        },
        "reward": {"url": "http://127.0.0.1:1"},
        "rollout": {"mode": "colocate"},
        "trainer": {"gpus_per_node": 0, "scratch_bytes": 1024},
        "checkpoint": {"uri": str(tmp_path / "checkpoints")},
        "progress": {"configmap": "c", "namespace": "ns"},
    }
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "lmmr1_trainer.train", "--config", str(path)],
        env={**os.environ, **CPU_ENV, "LMMR1_WORKDIR": str(tmp_path / "work")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr[-2000:]
    assert "resources.trainer.scratchSize" in result.stderr
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
