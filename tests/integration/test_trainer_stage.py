"""A real (tiny) LMM-R1 stage on CPU against the test bed's S3 server: the model and a
synthetic multimodal dataset in S3, a verifier and two transformers rollout servers as
subprocesses, the trainer with DeepSpeed ZeRO-2 on CPU writing checkpoints to S3. The
trainer is killed mid-run (SIGKILL) and restarted: it must resume from the last committed
checkpoint and finish the stage with a final checkpoint, progress and termination message.
Every reward request goes through a recording proxy: each sample reaches the verifier with
its own prompt's label, and answers that match it earn accuracy. (Two ranks, and a resume
that must redo steps: tests/integration/test_trainer_learning.py.) Also: the progress
reporter against the test bed's API server, and the model cache.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from tests.trainer_harness import (
    RewardCall,
    recording_verifier,
    rollout_servers,
    run_until_killed,
    stage_config,
    start_trainer,
    write_stage,
    write_token,
)

from lmmr1_testbed.layout import TestBedState
from lmmr1_trainer.checkpoint import CheckpointStore
from lmmr1_trainer.config import (
    PROGRESS_KEY,
    DatasetConfig,
    Progress,
    ProgressConfig,
    S3Settings,
)
from lmmr1_trainer.localrun import Service
from lmmr1_trainer.progress import ConfigMapReporter
from lmmr1_trainer.storage import open_storage, upload_tree
from lmmr1_trainer.train import step_records

MAX_STEPS = 5
KILL_AFTER_STEP = 2
ASSISTANT = "<|im_start|>assistant\n"


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
        learning_rate=1e-4,  # 1e-3 collapses the tiny model to reward 0 after one step
    )


def _generate_requests(url: str) -> float:
    """How many /generate requests a rollout server answered (its Prometheus counter)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("lmmr1_rollout_requests_total{")
        and 'endpoint="/generate"' in line
        and 'code="200"' in line
    )


def _check_reward_calls(calls: list[RewardCall], labels_by_prompt: dict[str, set[str]]) -> int:
    """Every sample went to the verifier with a label of its own prompt (text prompts are
    unique, so exactly theirs), and a response whose answer is the label earned accuracy.
    Returns the number of samples that earned accuracy."""
    earned = 0
    for call in calls:
        assert len(call.queries) == len(call.prompts) == len(call.labels)
        assert len(call.scores["acc_rewards"]) == len(call.queries)
        for query, prompt, label, accuracy in zip(
            call.queries, call.prompts, call.labels, call.scores["acc_rewards"], strict=True
        ):
            assert label in labels_by_prompt[prompt], (prompt[-80:], label)
            if "<|image_pad|>" not in prompt:
                assert query.startswith(prompt), (query[:200], prompt[-80:])
            response = query.split(ASSISTANT)[-1]
            answers = re.findall(r"<answer>(.*?)</answer>", response, re.DOTALL)
            if answers and answers[-1].strip() == label:
                assert accuracy == 1.0, (response, label)
            earned += accuracy > 0
    return earned


def test_stage_trains_checkpoints_to_s3_and_resumes_after_a_kill(
    testbed: TestBedState,
    s3_bucket: str,
    s3_env: dict[str, str],
    answering_model: Path,
    verifier: Service,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint = testbed.s3_endpoint
    upload_tree(open_storage(f"s3://{s3_bucket}/models/tiny"), answering_model, "")
    # One prefix, two files: a few text prompts, and image prompts to count shapes in (the
    # answering model gets those right now and then: accuracy can be earned).
    for task, folder, count in (("arithmetic", "text", 4), ("counting", "images", 12)):
        subprocess.run(
            [sys.executable, "-m", "lmmr1_trainer.synthetic", "--task", task, "--count",
             str(count), "--out", f"s3://{s3_bucket}/data/{folder}", "--s3-endpoint", endpoint],
            check=True, env={**os.environ, **s3_env}, capture_output=True,
        )  # fmt: skip
    token = write_token(tmp_path)
    server_stage = _stage_config(s3_bucket, endpoint, [], verifier.url, token)
    with (
        rollout_servers(server_stage, tmp_path, 2, s3_env) as rollouts,
        recording_verifier(verifier.url) as (reward_url, calls),
    ):
        urls = [r.url for r in rollouts]
        stage = _stage_config(s3_bucket, endpoint, urls, reward_url, token)
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
        summary = [(s["step"], round(s["reward"], 3), s["accuracy"], s["seconds"]) for s in steps]
        print(f"trained {len(steps)} steps in {time.monotonic() - started:.1f}s:", summary)

        # Both rollout servers generated (each step splits its prompts between them) and
        # both serve the final policy.
        assert all(_generate_requests(url) >= MAX_STEPS for url in urls), urls
        for url in urls:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
                assert json.loads(response.read())["weight_version"] == MAX_STEPS

    # What the verifier was asked: each sample with its own prompt's label. And accuracy,
    # not only format, was earned, and reported in the step records.
    from lmmr1_trainer.data import load_dataset
    from lmmr1_trainer.models import ChatEncoder

    encoder = ChatEncoder.load(answering_model)
    rows = load_dataset(DatasetConfig(**stage["dataset"]), S3Settings(endpoint=endpoint))
    labels_by_prompt: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        labels_by_prompt[encoder.prompt_text(row.messages)].add(row.label)
    assert len(calls) >= MAX_STEPS
    earned = _check_reward_calls(calls, labels_by_prompt)
    assert earned > 0, "no sample earned accuracy: only format reward reached the trainer"
    assert any(s["accuracy"] > 0 for s in steps), steps

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
    from lmmr1_trainer.models import load_model, resolve_model

    monkeypatch.setenv("LMMR1_MODEL_CACHE", str(tmp_path / "final"))
    final_dir = resolve_model(final_uri, None)
    assert not (final_dir / "trainer_state").exists()
    model, final_encoder = load_model(final_dir), ChatEncoder.load(final_dir)
    assert final_encoder.image_token_id is not None and model.config.model_type == "qwen2_5_vl"


def test_progress_reaches_the_configmap(
    testbed: TestBedState, kube_client: Any, namespace: str
) -> None:
    from kubernetes import client

    api = client.CoreV1Api(kube_client)
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name="run-progress"), data={})
    api.create_namespaced_config_map(namespace, body)
    reporter = ConfigMapReporter(ProgressConfig(configmap="run-progress", namespace=namespace), api)
    progress = Progress(stage="fre", step=3, total_steps=10, reward=0.5, updated_at="now")
    assert reporter.report(progress)
    data = api.read_namespaced_config_map("run-progress", namespace).data
    assert data is not None
    assert Progress.model_validate_json(data[PROGRESS_KEY]) == progress
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


RANK_RESOLVING = """
import sys, time
from pathlib import Path
import lmmr1_trainer.models as models

uri, go, log = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
download = models.download_objects

def counted(*args, **kwargs):  # the real download, counted
    with log.open("a") as out:
        out.write("download\\n")
    return download(*args, **kwargs)

models.download_objects = counted
(go.parent / f"ready-{sys.argv[4]}").touch()
while not go.exists():  # every rank starts at once, as torchrun's do
    time.sleep(0.005)
print(models.resolve_model(uri))
"""


def test_the_ranks_of_a_pod_download_a_model_once(
    s3_bucket: str, s3_env: dict[str, str], tmp_path: Path
) -> None:
    """Four ranks sharing a cache resolve the same S3 model at the same moment: one
    downloads it, the others wait and use that copy (without the lock, each downloads)."""
    uri = f"s3://{s3_bucket}/models/shared"
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(os.urandom(32 * 1024 * 1024))
    upload_tree(open_storage(uri), source, "")
    script, go, log = tmp_path / "rank.py", tmp_path / "go", tmp_path / "downloads"
    script.write_text(RANK_RESOLVING)
    env = {**os.environ, **s3_env, "LMMR1_MODEL_CACHE": str(tmp_path / "cache")}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), uri, str(go), str(log), str(rank)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(4)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)  # every rank has imported and polls for the start
    go.touch()
    paths = {rank.communicate(timeout=120)[0].strip() for rank in ranks}
    assert [rank.returncode for rank in ranks] == [0] * 4
    assert len(paths) == 1
    assert (Path(paths.pop()) / "model.safetensors").read_bytes() == (
        source / "model.safetensors"
    ).read_bytes()
    assert log.read_text().splitlines() == ["download"]
