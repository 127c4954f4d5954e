"""The trainer benchmark's pure parts: the stage it runs is a valid, TRL-aligned stage, step-log
records become step timings, the table renders failures, the doc section is replaced in
place, and our rows become TRL examples. No timing is asserted: numbers live in
docs/benchmarks.md."""

from __future__ import annotations

import json
from pathlib import Path

from lmmr1_bench.trainer import (
    SECTION_TITLE,
    BenchCase,
    BenchSettings,
    RunResult,
    StepTiming,
    median_step,
    ours_step_timing,
    pooled,
    render_row,
    replace_section,
    stage_config,
)
from lmmr1_bench.trainer_trl import trl_example
from lmmr1_trainer.config import DatasetConfig, StageConfig
from lmmr1_trainer.data import ImageLoader, PromptRow, load_dataset
from lmmr1_trainer.engine import plan_batches
from lmmr1_trainer.synthetic import IMAGE_SIZE, chat_message, write_dataset
from lmmr1_trainer.train import STEP_LOG_PREFIX, step_records


def _step(seconds: float, generate: float = 0.0) -> StepTiming:
    return StepTiming(seconds, generate, 0.1, 0.2, 0.05, 20.0)


def test_the_stage_is_valid_colocated_and_does_one_update_per_rollout_batch(
    tmp_path: Path,
) -> None:
    settings = BenchSettings()
    case = BenchCase("multimodal", tmp_path / "model", "file:///data/train.jsonl")
    config = StageConfig.model_validate(stage_config(case, settings, tmp_path, "http://v"))
    assert (config.rollout.mode, config.rollout.backend) == ("colocate", "vllm")  # the default
    assert config.dataset.type == "multimodal"
    assert config.algorithm.advantage_estimator == "grpo"  # TRL's group normalisation
    assert not config.algorithm.kl_in_reward and config.algorithm.kl_estimator == "k3"
    assert config.checkpoint.every_steps > settings.steps  # only the final checkpoint
    plan = plan_batches(config.algorithm, world_size=1)
    assert plan.updates_per_rollout == 1
    assert plan.micro_batches_per_update == settings.samples_per_step // settings.micro_batch


def test_step_log_records_become_timings_without_the_checkpoint() -> None:
    record = {
        "step": 2,
        "seconds": 3.0,
        "checkpoint_seconds": 1.0,
        "generate_seconds": 0.5,
        "reward_seconds": 0.1,
        "update_seconds": 1.2,
        "sync_seconds": 0.1,
        "response_length": 17.5,
    }
    lines = ["noise", STEP_LOG_PREFIX + json.dumps(record)]
    (parsed,) = step_records(lines)
    timing = ours_step_timing(parsed)
    assert timing.seconds == 2.0
    assert round(timing.other, 6) == 0.1


def test_the_median_is_a_real_step_so_its_phases_add_up() -> None:
    median = median_step([_step(1.0, 0.9), _step(3.0, 0.1), _step(2.0, 0.5), _step(4.0)])
    assert (median.seconds, median.generate) == (2.0, 0.5)


def test_a_row_shows_the_ratios_or_why_a_run_failed() -> None:
    ours = RunResult([_step(1.5)])
    row = render_row("text", ours, RunResult([_step(1.0)]), RunResult([_step(3.0)]))
    assert "| 1.50 | 1.00 | 3.00 | 1.50x | 0.50x |" in row
    quartiles = RunResult([_step(1.0), _step(2.0), _step(3.0)]).seconds_cell()
    assert quartiles == "2.00 (1.50-2.50)"  # within the measured range
    failed = render_row(
        "multimodal", ours, RunResult([_step(1.0)]), RunResult(error="ValueError: no | images")
    )
    assert "failed: ValueError: no \\| images" in failed
    assert "| 1.50x | n/a |" in failed


def test_the_section_replaces_the_previous_one_and_keeps_what_follows() -> None:
    document = f"# B\n\n## Other\n\nkept\n\n{SECTION_TITLE}, old\n\nold table\n\n### Next\n"
    updated = replace_section(document, f"{SECTION_TITLE}, new\n\nnew table\n")
    assert "old table" not in updated and "new table" in updated
    assert updated.index("## Other") < updated.index("new table") < updated.index("### Next")
    appended = replace_section("# Benchmarks\n", f"{SECTION_TITLE}, new\n")
    assert appended.endswith(f"\n\n{SECTION_TITLE}, new\n")


def test_a_row_becomes_a_trl_example_with_string_contents(tmp_path: Path) -> None:
    row = PromptRow(0, chat_message("What is 2 + 2?", None), "4")
    example = trl_example(row, ImageLoader())
    assert example["answer"] == "4"
    assert [m["role"] for m in example["prompt"]] == ["system", "user"]
    assert example["prompt"][1]["content"] == "What is 2 + 2?"
    assert "images" not in example


def test_an_image_row_hands_trl_the_decoded_image(tmp_path: Path) -> None:
    uri = write_dataset("digits", 1, 0, str(tmp_path))
    (row,) = load_dataset(DatasetConfig(uri=uri, type="multimodal"))
    example = trl_example(row, ImageLoader())
    (image,) = example["images"]
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert example["prompt"][1]["content"] == "What number is written in the image?"


def test_runs_are_pooled_and_one_failure_fails_the_pool() -> None:
    first, second = RunResult([_step(1.0)]), RunResult([_step(2.0), _step(3.0)])
    assert [step.seconds for step in pooled([first, second]).steps] == [1.0, 2.0, 3.0]
    assert pooled([first, RunResult(error="boom")]).error == "boom"
