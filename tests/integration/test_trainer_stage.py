"""A real (tiny) LMM-R1 stage on CPU against the test bed's S3 server: the model and the
synthetic multimodal dataset in S3, a verifier and a transformers rollout server as
subprocesses, the trainer with DeepSpeed ZeRO-2 on CPU writing checkpoints to S3. The
trainer is killed mid-run (SIGKILL) and restarted: it must resume from the last committed
checkpoint and finish the stage with a final checkpoint, progress and termination message.
Also: the progress reporter against the test bed's API server.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.trainer_harness import (
    rollout_server,
    run_until_killed,
    stage_config,
    start_trainer,
    trainer_env,
    write_stage,
    write_token,
)

from lmmr1_testbed.layout import TestBedState
from lmmr1_trainer.checkpoint import CheckpointStore
from lmmr1_trainer.config import PROGRESS_KEY, Progress, ProgressConfig
from lmmr1_trainer.localrun import Service
from lmmr1_trainer.progress import ConfigMapReporter
from lmmr1_trainer.storage import open_storage, upload_tree
from lmmr1_trainer.train import WEIGHT_DIGEST_ENV, WEIGHTS_LOG_PREFIX, step_records

MAX_STEPS = 5
KILL_AFTER_STEP = 2


def _stage_config(
    bucket: str, endpoint: str, rollout_urls: list[str], reward_url: str, token_file: Path
) -> dict[str, Any]:
    return stage_config(
        init_from=f"s3://{bucket}/models/tiny",
        dataset={"uri": f"s3://{bucket}/data", "type": "multimodal"},
        checkpoint_uri=f"s3://{bucket}/ckpt/ns/tiny/mgt",
        rollout_urls=rollout_urls,
        reward_url=reward_url,
        token_file=token_file,
        s3_endpoint=endpoint,
        max_steps=MAX_STEPS,
    )


def test_stage_trains_checkpoints_to_s3_and_resumes_after_a_kill(
    testbed: TestBedState,
    s3_bucket: str,
    s3_env: dict[str, str],
    warm_model: Path,
    verifier: Service,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint = testbed.s3_endpoint
    upload_tree(open_storage(f"s3://{s3_bucket}/models/tiny"), warm_model, "")
    for task, folder in (("arithmetic", "text"), ("mixed", "images")):  # one prefix, two files
        subprocess.run(
            [sys.executable, "-m", "lmmr1_trainer.synthetic", "--task", task, "--count", "8",
             "--out", f"s3://{s3_bucket}/data/{folder}", "--s3-endpoint", endpoint],
            check=True, env={**os.environ, **s3_env}, capture_output=True,
        )  # fmt: skip
    token = write_token(tmp_path)
    server_stage = _stage_config(s3_bucket, endpoint, [], verifier.url, token)
    with rollout_server(server_stage, tmp_path, s3_env) as rollout:
        stage = _stage_config(s3_bucket, endpoint, [rollout.url], verifier.url, token)
        config = write_stage(tmp_path / "stage.yaml", stage)
        store = CheckpointStore(open_storage(stage["checkpoint"]["uri"]))

        # Run 1: kill it (SIGKILL, no clean-up) right after step 2's checkpoint.
        started = time.monotonic()
        first_lines = run_until_killed(config, tmp_path, KILL_AFTER_STEP, s3_env)
        output = "".join(first_lines[-30:])
        resumed_from = store.latest()
        assert resumed_from is not None and resumed_from >= KILL_AFTER_STEP, output
        assert not (tmp_path / "termination-log").exists()

        # Run 2: resumes from the newest committed checkpoint and finishes the stage.
        second = start_trainer(config, tmp_path, s3_env)
        out, _ = second.communicate(timeout=400)
        assert second.returncode == 0, out[-4000:]
        lines = out.splitlines(keepends=True)
        assert f"resumed from {store.uri(resumed_from)} (step {resumed_from})" in out
        steps = step_records(first_lines) + step_records(lines)
        assert [s["step"] for s in step_records(lines)] == list(
            range(resumed_from + 1, MAX_STEPS + 1)
        )
        assert all(math.isfinite(s["reward"]) and math.isfinite(s["policy_loss"]) for s in steps)
        assert all(math.isfinite(s["kl"]) for s in steps)
        print(f"trained {len(steps)} steps in {time.monotonic() - started:.1f}s:",
              [(s["step"], round(s["reward"], 3), s["seconds"]) for s in steps])  # fmt: skip

        assert store.latest() == MAX_STEPS and store.manifest(MAX_STEPS).final
        assert store.committed_steps() == sorted({resumed_from, MAX_STEPS - 1, MAX_STEPS})
        final_uri = store.uri(MAX_STEPS)
        progress = Progress.model_validate_json((tmp_path / "progress.json").read_text())
        assert progress.final_checkpoint == final_uri and progress.step == MAX_STEPS
        assert progress.reward is not None and math.isfinite(progress.reward)
        assert progress.initial_reward is not None
        termination = json.loads((tmp_path / "termination-log").read_text())
        assert termination == {"final_checkpoint": final_uri, "step": MAX_STEPS}

        # The final checkpoint is an HF model the next stage (or transformers) loads as is.
        from lmmr1_trainer.models import ChatEncoder, load_model, resolve_model

        monkeypatch.setenv("LMMR1_MODEL_CACHE", str(tmp_path / "final"))
        final_dir = resolve_model(final_uri, None)
        assert not (final_dir / "trainer_state").exists()
        model, encoder = load_model(final_dir), ChatEncoder.load(final_dir)
        assert encoder.image_token_id is not None and model.config.model_type == "qwen2_5_vl"
        health = json.loads(
            __import__("urllib.request").request.urlopen(f"{rollout.url}/health").read()
        )
        assert health["weight_version"] == MAX_STEPS  # the servers serve the final policy


def test_two_cpu_ranks_train_and_checkpoint_every_zero_shard(
    testbed: TestBedState,
    s3_bucket: str,
    s3_env: dict[str, str],
    warm_model: Path,
    verifier: Service,
    tmp_path: Path,
) -> None:
    """torchrun with 2 ranks (gloo): rank 0 drives rollouts, both train their share, both
    hold identical weights after every step, and the checkpoint holds both ZeRO-2 optimizer
    shards."""
    endpoint = testbed.s3_endpoint
    upload_tree(open_storage(f"s3://{s3_bucket}/models/tiny"), warm_model, "")
    subprocess.run(
        [sys.executable, "-m", "lmmr1_trainer.synthetic", "--task", "arithmetic", "--count", "8",
         "--out", f"s3://{s3_bucket}/data", "--s3-endpoint", endpoint],
        check=True, env={**os.environ, **s3_env}, capture_output=True,
    )  # fmt: skip
    token = write_token(tmp_path)
    server_stage = _stage_config(s3_bucket, endpoint, [], verifier.url, token)
    with rollout_server(server_stage, tmp_path, s3_env) as rollout:
        stage = _stage_config(s3_bucket, endpoint, [rollout.url], verifier.url, token)
        stage["algorithm"].update(max_steps=2, gradient_checkpointing=False)
        config = write_stage(tmp_path / "stage.yaml", stage)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        result = subprocess.run(
            [*torchrun, "-m", "lmmr1_trainer.train", "--config", str(config)],
            capture_output=True, text=True, timeout=300,
            env=trainer_env(tmp_path, {**s3_env, WEIGHT_DIGEST_ENV: "1"}),
        )  # fmt: skip
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        assert [s["step"] for s in step_records(result.stdout.splitlines())] == [1, 2]
        digests: dict[int, dict[int, str]] = {}
        for line in result.stdout.splitlines():
            if line.startswith(WEIGHTS_LOG_PREFIX):
                record = json.loads(line[len(WEIGHTS_LOG_PREFIX) :])
                digests.setdefault(record["step"], {})[record["rank"]] = record["sha256"]
        assert sorted(digests) == [1, 2] and all(len(d) == 2 for d in digests.values())
        assert digests[1][0] == digests[1][1] and digests[2][0] == digests[2][1]
        assert digests[1][0] != digests[2][0]  # the weights did change
        store = CheckpointStore(open_storage(stage["checkpoint"]["uri"]))
        files = {f.path for f in store.manifest(2).files}
        for rank in (0, 1):
            assert (
                f"trainer_state/deepspeed/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
            )


def test_progress_reaches_the_configmap(
    testbed: TestBedState, kube_client: Any, namespace: str
) -> None:
    from kubernetes import client

    api = client.CoreV1Api(kube_client)
    api.create_namespaced_config_map(namespace, {"metadata": {"name": "run-progress"}, "data": {}})
    reporter = ConfigMapReporter(ProgressConfig(configmap="run-progress", namespace=namespace), api)
    progress = Progress(stage="fre", step=3, total_steps=10, reward=0.5, updated_at="now")
    assert reporter.report(progress)
    stored = api.read_namespaced_config_map("run-progress", namespace).data[PROGRESS_KEY]
    assert Progress.model_validate_json(stored) == progress
    missing = ConfigMapReporter(ProgressConfig(configmap="absent", namespace=namespace), api)
    assert missing.report(progress) is False  # logged, never raised


def test_model_cache_follows_the_content_of_an_s3_uri(
    s3_bucket: str, s3_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model re-uploaded to the same URI is downloaded again, never served stale from a
    node's cache (the demo once trained FRE from a previous session's cached base model)."""
    from lmmr1_trainer.models import resolve_model

    monkeypatch.setenv("LMMR1_MODEL_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{s3_bucket}/models/m"
    storage = open_storage(uri)

    def upload(weights: bytes) -> None:
        source = tmp_path / "source"
        (source / "trainer_state").mkdir(parents=True, exist_ok=True)
        (source / "config.json").write_text("{}")
        (source / "model.safetensors").write_bytes(weights)
        (source / "trainer_state" / "state.pt").write_bytes(b"optimizer")
        upload_tree(storage, source, "")

    upload(b"first")
    first = resolve_model(uri)
    assert (first / "model.safetensors").read_bytes() == b"first"
    assert not (first / "trainer_state").exists()
    assert resolve_model(uri) == first  # unchanged content: the cached copy
    upload(b"second")
    second = resolve_model(uri)
    assert second != first and (second / "model.safetensors").read_bytes() == b"second"
    assert not first.exists()  # the stale copy is removed
    assert [p.name for p in second.parent.iterdir()] == [second.name]
