"""A stage that mixes text-only and image prompts, on two ranks under DeepSpeed ZeRO-3 (CPU,
gloo, `LMMR1_CPU_ZERO3=1`), with vLLM colocated in each rank and the vision tower frozen
(`freeze_prefix: [visual]`, as LMM-R1's Sokoban script), runs to its final checkpoint
(issue 16). Local processes only: no test bed.

The dataset has one text prompt and one image prompt and a step takes both (rollout batch
2), each with 4 samples: the samples are scattered to the ranks in prompt order, so one rank
trains on the text prompt's samples and the other on the image prompt's, two micro-batches
each. Without the blank-image forward of the vision tower the first ZeRO-3 forward of such a
step fails (the ranks' parameter gathers no longer match; see
tests/unit/test_trainer_vision_tower.py). The final checkpoint holds the vision tower as it
started and a trained language model: the frozen weights went through the ZeRO-3 gathers of
weight sync and of the checkpoint unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from tests.trainer_harness import (
    run_trainer,
    stage_config,
    synthetic_dataset,
    two_ranks,
    write_stage,
    write_token,
)

from lmmr1_trainer.checkpoint import CheckpointStore
from lmmr1_trainer.engine import CPU_ZERO3_ENV
from lmmr1_trainer.localrun import Service
from lmmr1_trainer.storage import open_storage

STEPS = 2


def test_a_mixed_stage_on_two_zero3_ranks_finishes_with_the_tower_frozen(
    warm_model: Path, verifier: Service, tmp_path: Path
) -> None:
    model = warm_model  # rewards vary among its samples: the language model is trained
    data = tmp_path / "data"
    data.mkdir()
    for task in ("arithmetic", "counting"):
        jsonl = synthetic_dataset(tmp_path / task, task, 1)
        shutil.copy(jsonl, data / f"{task}.jsonl")  # images keep their absolute file:// URIs
    stage = stage_config(
        init_from=str(model),
        dataset={"uri": str(data), "type": "multimodal"},
        checkpoint_uri=str(tmp_path / "checkpoints"),
        rollout_urls=[],
        reward_url=verifier.url,
        token_file=write_token(tmp_path),
        samples_per_prompt=4,
        rollout_batch_size=2,
        train_batch_size=8,
        micro_train_batch_size=2,
        zero_stage=3,
        freeze_prefix=["visual"],
        max_steps=STEPS,
    )
    stage["checkpoint"]["every_steps"] = STEPS
    config = write_stage(tmp_path / "stage.yaml", stage)
    (tmp_path / "run").mkdir()
    records = run_trainer(
        config, tmp_path / "run", {CPU_ZERO3_ENV: "1"}, program=two_ranks(), timeout_s=1200
    )

    print([(r["reward"], r["policy_loss"]) for r in records])
    assert [r["step"] for r in records] == [1, 2]
    assert all(sorted(r["rows"]) == [0, 1] for r in records)  # a text and an image prompt
    store = CheckpointStore(open_storage(stage["checkpoint"]["uri"]))
    assert store.latest() == STEPS
    store.download(STEPS, tmp_path / "final", skip_prefix="trainer_state/")
    start, final = (
        load_file(model / "model.safetensors"),
        load_file(tmp_path / "final" / "model.safetensors"),
    )
    assert start.keys() <= final.keys()
    tower = [k for k in start if k.startswith("visual.")]
    assert tower and all(torch.equal(final[k], start[k]) for k in tower)
    trained = [
        k for k in start if not k.startswith("visual.") and not torch.equal(final[k], start[k])
    ]
    assert "model.norm.weight" in trained, trained
