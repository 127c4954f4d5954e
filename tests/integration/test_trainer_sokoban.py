"""A tiny Sokoban stage end to end on CPU, as `train_sokoban.yaml` runs it at scale: the
generator's levels and frames (`python -m lmmr1_trainer.tasks.sokoban generate`), the
built-in `sokoban` verifier as a real service (`--default-task sokoban`, the flag the
operator renders from `reward.verifier`), and the real trainer with vLLM colocated (the
default), PPO with a critic (`gae`), the vision tower frozen and no KL, on a tiny
Qwen2.5-VL warm-started on Sokoban answers (`--warm-start-task sokoban`). Checkpoints go to
a `file://` URI. Local processes only: no test bed (it sits in tests/integration, with
the other tests that run the trainer, and so carries their `integration` marker).

Every reward request goes through a recording proxy: each sample reaches the verifier with a
generated level as its label, and each reward is the Sokoban replay of that response in that
level (format 0.5 plus the task reward, or 0 when the format fails); some responses are well
formed, so the format reward and the replay are exercised, not only the zero.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.trainer_harness import (
    build_tiny_model,
    recording_verifier,
    run_trainer,
    stage_config,
    write_stage,
    write_token,
)

from lmmr1_trainer.checkpoint import CheckpointStore
from lmmr1_trainer.localrun import CPU_ENV, Service, start_service
from lmmr1_trainer.storage import open_storage
from lmmr1_trainer.tasks.sokoban.level import Level
from lmmr1_trainer.verifier.config import PromptTemplate, ResponseExtraction
from lmmr1_trainer.verifier.sokoban import score_response
from lmmr1_trainer.verifier.templates import extract_response

STEPS = 2


@pytest.fixture(scope="module")
def sokoban_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 SFT steps on Sokoban frames answered with moves: measured 2 of 8 samples well
    formed (one of them solving its level) with 48 new tokens; some others were cut short."""
    out = tmp_path_factory.mktemp("tiny-vl-sokoban")
    return build_tiny_model(out, warm_start_steps=100, warm_start_task="sokoban")


@pytest.fixture(scope="module")
def sokoban_verifier() -> Iterator[Service]:
    argv = ["lmmr1_trainer.verifier", "--host", "127.0.0.1", "--port", "0", "--workers", "1"]
    service = start_service([*argv, "--default-task", "sokoban"], "lmmr1-verifier listening on ")
    yield service
    service.stop()


def _dataset(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "lmmr1_trainer.tasks.sokoban", "generate", "--out", str(out),
         "--count", "4", "--seed", "5", "--boxes", "1", "2", "--max-moves", "8",
         "--image-height", "112"],
        check=True, env={**os.environ, **CPU_ENV}, capture_output=True,
    )  # fmt: skip
    return out / "train.jsonl"


@pytest.mark.timeout(1200)  # the warm start and the stage on a few shared CPU cores
def test_a_sokoban_stage_scores_replays_and_finishes(
    sokoban_model: Path, sokoban_verifier: Service, tmp_path: Path
) -> None:
    data = _dataset(tmp_path / "sokoban")
    levels = {json.loads(line)["answer"] for line in data.read_text().splitlines()}
    checkpoints = (tmp_path / "checkpoints").as_uri()
    with recording_verifier(sokoban_verifier.url) as (reward_url, calls):
        stage = stage_config(
            init_from=str(sokoban_model),
            dataset={"uri": str(data), "type": "multimodal"},
            checkpoint_uri=checkpoints,
            rollout_urls=[],  # colocated vLLM
            reward_url=reward_url,
            token_file=write_token(tmp_path),
            stage="sokoban",
            advantage_estimator="gae",
            freeze_prefix=["visual"],
            kl_coef=0.0,
            samples_per_prompt=4,
            rollout_batch_size=2,
            train_batch_size=8,
            micro_train_batch_size=4,
            max_generation_length=64,
            learning_rate=1e-4,  # the harness's 1e-3 garbles the tiny model's answers at once
            max_steps=STEPS,
        )
        stage["reward"]["verifier"] = "sokoban"
        stage["checkpoint"]["every_steps"] = STEPS
        (tmp_path / "run").mkdir()
        records = run_trainer(write_stage(tmp_path / "stage.yaml", stage), tmp_path / "run")

    print([(r["reward"], r.get("format_reward")) for r in records])
    assert [r["step"] for r in records] == [1, 2]
    store = CheckpointStore(open_storage(checkpoints))
    assert store.latest() == STEPS

    samples = [
        (query, label, reward, format_reward)
        for call in calls
        for query, label, reward, format_reward in zip(
            call.queries,
            call.labels,
            call.scores["rewards"],
            call.scores["format_rewards"],
            strict=True,
        )
    ]
    assert len(samples) == STEPS * 2 * 4
    assert {label for _, label, _, _ in samples} <= levels
    for query, label, reward, format_reward in samples:
        response = extract_response(query, PromptTemplate.CHATML, ResponseExtraction.REFERENCE)
        expected = score_response(response.text, Level.parse(label))
        assert format_reward == (0.5 if expected.well_formed else 0.0), response.text
        assert reward == pytest.approx(format_reward + expected.task_reward), response.text
    well_formed = [reward for _, _, reward, format_reward in samples if format_reward == 0.5]
    assert well_formed, "no response passed the sokoban format: nothing was replayed"
