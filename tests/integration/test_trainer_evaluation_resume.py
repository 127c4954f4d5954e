"""A stage's middle evaluation survives a trainer that dies between committing a checkpoint
and measuring it: the next attempt resumes from that checkpoint and measures it first, and
reads back (does not measure again) every evaluation an earlier attempt stored.

The real trainer (tiny model, colocated vLLM on CPU), the real verifier service and
`file://` checkpoints: local processes only, no test bed. The "died in between" state is
made by hand from a finished stage: the last checkpoint and the last two result files are
removed, which is what storage holds when an attempt is killed right after committing
step 2 (its result file for step 2 not yet written).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.trainer_harness import (
    run_trainer_output,
    stage_config,
    synthetic_dataset,
    write_stage,
    write_token,
)

from lmmr1_trainer.checkpoint import CheckpointStore
from lmmr1_trainer.evaluation import result_key
from lmmr1_trainer.localrun import Service, start_service
from lmmr1_trainer.storage import open_storage
from lmmr1_trainer.tiny_model import build_tiny_model

STEPS = 3


@pytest.fixture(scope="module")
def verifier() -> Iterator[Service]:
    argv = ["lmmr1_trainer.verifier", "--host", "127.0.0.1", "--port", "0", "--workers", "1"]
    service = start_service(argv, "lmmr1-verifier listening on ")
    yield service
    service.stop()


def _measured(lines: list[str]) -> list[int]:
    """The steps this attempt evaluated itself (a result read back logs nothing)."""
    return [int(m) for m in re.findall(r"evaluation at step (\d+) \(", "\n".join(lines))]


def test_a_resumed_stage_measures_the_checkpoint_it_resumes_from_once(
    verifier: Service, tmp_path: Path
) -> None:
    model = build_tiny_model(tmp_path / "model")
    data = synthetic_dataset(tmp_path / "train", "arithmetic", 8)
    heldout = synthetic_dataset(tmp_path / "heldout", "arithmetic", 4)
    checkpoints = tmp_path / "checkpoints"
    stage = stage_config(
        init_from=str(model),
        dataset={"uri": str(data), "type": "text"},
        checkpoint_uri=checkpoints.as_uri(),
        rollout_urls=[],
        reward_url=verifier.url,
        token_file=write_token(tmp_path),
        stage="fre",
        max_steps=STEPS,
    )
    stage["checkpoint"]["keep_last"] = STEPS
    stage["evaluation"] = {
        "every_steps": 1,
        "datasets": [{"name": "heldout", "uri": str(heldout), "type": "text"}],
    }
    config = write_stage(tmp_path / "stage.yaml", stage)
    (tmp_path / "first").mkdir()
    first = run_trainer_output(config, tmp_path / "first")
    assert _measured(first) == [0, 1, 2, 3]
    store = CheckpointStore(open_storage(checkpoints.as_uri()))
    assert store.latest() == STEPS

    # Killed right after committing step 2: no step 3, no result for step 2 yet.
    shutil.rmtree(checkpoints / f"step-{STEPS}")
    for step in (2, 3):
        (checkpoints / result_key(step)).unlink()
    assert store.latest() == 2

    (tmp_path / "second").mkdir()
    second = run_trainer_output(config, tmp_path / "second")
    assert "resumed from" in "\n".join(second)
    # Step 2 measured from its checkpoint before step 3 trains; 0 and 1 read back.
    assert _measured(second) == [2, 3]
    result = json.loads((checkpoints / result_key(2)).read_text())
    assert result["step"] == 2
    assert result["checkpoint"] == store.uri(2)
    assert sorted(int(p.stem.split("-")[1]) for p in (checkpoints / "evaluation").iterdir()) == [
        0,
        1,
        2,
        3,
    ]
