"""Evaluation sets get the training data's pre-flight check: a set that cannot be read
fails the stage (exit 78, the set named) before any rollout, whatever its onBadRow; bad rows
follow the set's own onBadRow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tests.trainer_harness import stage_config, start_trainer, write_stage, write_token

from lmmr1_trainer.config import EXIT_CONFIG_ERROR, StageConfig
from lmmr1_trainer.data import DatasetError
from lmmr1_trainer.models import ChatEncoder
from lmmr1_trainer.preflight import checked_evaluation_rows
from lmmr1_trainer.synthetic import chat_message
from lmmr1_trainer.tiny_model import build_tiny_model
from lmmr1_trainer.train import step_records


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


def _rows(path: Path, count: int, bad_line: int | None = None) -> Path:
    lines = [
        json.dumps(
            {"message": json.dumps(chat_message(f"What is {i} + 1?", None)), "answer": i + 1}
        )
        for i in range(count)
    ]
    if bad_line is not None:
        lines[bad_line - 1] = json.dumps({"message": "What is 2 + 2?", "answer": "4"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(tmp_path: Path, *datasets: dict[str, Any]) -> StageConfig:
    return StageConfig.model_validate(
        {
            "run": {"namespace": "ns", "name": "r", "stage": "fre", "stage_index": 0},
            "init_from": "/unused",
            "dataset": {"type": "text", "uri": str(_rows(tmp_path / "train.jsonl", 4))},
            "reward": {"url": "http://127.0.0.1:1"},
            "checkpoint": {"uri": "/unused"},
            "progress": {"configmap": "c", "namespace": "ns"},
            "algorithm": {"max_prompt_length": 256},
            "evaluation": {
                "every_steps": 2,
                "datasets": [{"type": "text", **d} for d in datasets],
            },
        }
    )


def test_evaluation_sets_are_checked_and_bad_rows_follow_their_on_bad_row(
    tmp_path: Path, model_dir: Path
) -> None:
    encoder = ChatEncoder.load(model_dir)
    good = str(_rows(tmp_path / "good.jsonl", 3))
    flawed = str(_rows(tmp_path / "flawed.jsonl", 3, bad_line=2))
    sets, skipped = checked_evaluation_rows(
        _config(
            tmp_path,
            {"name": "good", "uri": good},
            {"name": "flawed", "uri": flawed, "on_bad_row": "skip"},
        ),
        encoder,
    )
    assert {name: len(rows) for name, rows in sets.items()} == {"good": 3, "flawed": 2}
    assert skipped == {"good": 0, "flawed": 1}
    with pytest.raises(DatasetError) as failed:
        checked_evaluation_rows(_config(tmp_path, {"name": "flawed", "uri": flawed}), encoder)
    message = str(failed.value)
    assert message.startswith(f"evaluation dataset 'flawed' ({flawed}): 1 of 3 dataset rows")
    assert "flawed.jsonl:2 message: not a JSON chat list" in message
    assert "onBadRow: skip on evaluation dataset 'flawed'" in message
    # Unreadable fails even with skip: an evaluation that measures nothing shows no gain.
    gone = str(tmp_path / "missing" / "test.jsonl")
    with pytest.raises(DatasetError, match=r"evaluation dataset 'gone' \(.*\) cannot be read"):
        checked_evaluation_rows(
            _config(tmp_path, {"name": "gone", "uri": gone, "on_bad_row": "skip"}), encoder
        )


def test_a_stage_whose_evaluation_set_is_unreadable_exits_78_naming_it(
    tmp_path: Path, model_dir: Path
) -> None:
    """The real stage entry point: good training data, an evaluation set that is not there.
    It exits 78 (the operator fails the run at once with the message) before any step."""
    missing = tmp_path / "heldout" / "test.jsonl"
    stage = stage_config(
        init_from=str(model_dir),
        dataset={"uri": str(_rows(tmp_path / "train.jsonl", 4)), "type": "text"},
        checkpoint_uri=str(tmp_path / "checkpoints"),
        rollout_urls=[],
        reward_url="http://127.0.0.1:1",  # never reached: the stage stops before
        token_file=write_token(tmp_path),
        stage="fre",
    )
    stage["evaluation"] = {
        "every_steps": 1,
        "datasets": [{"name": "heldout", "uri": str(missing), "type": "text"}],
    }
    work = tmp_path / "work"
    work.mkdir()
    process = start_trainer(write_stage(tmp_path / "stage.yaml", stage), work)
    out, _ = process.communicate(timeout=400)
    assert process.returncode == EXIT_CONFIG_ERROR, out[-3000:]
    message = (work / "termination-log").read_text()
    assert message.startswith(
        f"stage config: evaluation dataset 'heldout' ({missing}) cannot be read:"
    ), message
    assert step_records(out.splitlines()) == []
    assert not (tmp_path / "checkpoints" / "evaluation").exists()
