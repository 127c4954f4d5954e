"""Held-out evaluation's pure parts: pass@k, a set's metrics, the cadence, the ledger the
progress report carries, the result files beside the checkpoints (and that checkpoint
retention keeps them)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from lmmr1_trainer.checkpoint import CheckpointStore, FileEntry
from lmmr1_trainer.config import EvaluationConfig, EvaluationDatasetConfig, EvaluationResult
from lmmr1_trainer.evaluation import (
    Ledger,
    PromptScores,
    document,
    due,
    pass_at_k,
    result_key,
    stored,
    stored_steps,
    summarise,
    tracker_metrics,
)
from lmmr1_trainer.storage import LocalStorage


def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    """The definition: the share of all k-subsets of the samples holding a correct one."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_is_the_unbiased_estimator(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            correct = [True] * c + [False] * (n - c)
            expected = brute_force_pass_at_k(correct, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_stays_finite_for_many_samples() -> None:
    # C(200, 100) overflows a float; the running product does not.
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    assert pass_at_k(200, 0, 100) == 0.0
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_a_sets_metrics_average_samples_and_prompts() -> None:
    prompts = [
        PromptScores([1.0, 0.0, 0.0, 0.0], [True, True, False, True], [10, 20, 30, 40]),
        PromptScores([1.0, 1.0, 0.0, 1.0], [True, True, True, True], [5, 5, 5, 5]),
        PromptScores([0.0, 0.0, 0.0, 0.0], [False, False, False, False], [1, 1, 1, 1]),
    ]
    result = summarise(7, prompts, k=4, format_scored=True)
    assert result.step == 7 and result.prompts == 3 and result.k == 4
    assert result.accuracy == pytest.approx(4 / 12)
    assert result.format_rate == pytest.approx(7 / 12)
    assert result.response_length == pytest.approx((100 + 20 + 4) / 12)
    # pass@4 of 4 samples: solved at all -> 1; per prompt 1, 1, 0.
    assert result.pass_at_k == pytest.approx(2 / 3)
    greedy = summarise(0, [PromptScores([1.0], [True], [3])], k=1, format_scored=False)
    assert greedy.pass_at_k is None and greedy.format_rate is None


def test_the_cadence_is_every_n_steps_and_always_the_last() -> None:
    assert [s for s in range(0, 11) if due(s, 10, 4)] == [4, 8, 10]
    assert [s for s in range(0, 7) if due(s, 6, 2)] == [2, 4, 6]
    assert not due(0, 10, 1)  # step 0 is the baseline's, asked for on its own


def _result(step: int, accuracy: float) -> EvaluationResult:
    return EvaluationResult(step=step, accuracy=accuracy, response_length=3.0, prompts=16)


def test_the_ledger_keeps_baseline_latest_and_final() -> None:
    ledger = Ledger()
    ledger.record({"math": _result(0, 0.25)}, total_steps=10)
    ledger.record({"math": _result(4, 0.5)}, total_steps=10)
    report = ledger.report()
    assert report is not None
    math = report["math"]
    assert math.baseline and math.baseline.accuracy == 0.25
    assert math.latest and math.latest.step == 4 and math.final is None
    ledger.record({"math": _result(10, 0.75)}, total_steps=10)
    ledger.record({"math": _result(8, 0.6)}, total_steps=10)  # read back out of order
    math = (ledger.report() or {})["math"]
    assert math.final and math.final.accuracy == 0.75
    assert math.latest and math.latest.step == 10
    assert Ledger().report() is None


def test_tracker_metrics_are_plain_floats_per_set() -> None:
    passed = _result(4, 0.5).model_copy(update={"pass_at_k": 0.9, "k": 8, "format_rate": 1.0})
    metrics = tracker_metrics({"math": passed, "geo": _result(4, 0.1)})
    assert metrics["math"] == {
        "accuracy": 0.5,
        "response_length": 3.0,
        "prompts": 16.0,
        "pass_at_8": 0.9,
        "format_rate": 1.0,
    }
    assert set(metrics["geo"]) == {"accuracy", "response_length", "prompts"}


def _config() -> EvaluationConfig:
    return EvaluationConfig(
        datasets=[EvaluationDatasetConfig(name="math", uri="/d/e.jsonl", type="text")],
        every_steps=2,
    )


def test_a_result_file_reads_back_and_survives_checkpoint_retention(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "stage")
    store = CheckpointStore(storage)
    for step in (2, 4, 6):
        (tmp_path / "w").mkdir(exist_ok=True)
        (tmp_path / "w" / "model.safetensors").write_bytes(b"x" * step)
        entries = store.upload(step, tmp_path / "w")
        store.commit(step, [FileEntry(path=p.path, size=p.size, sha256=p.sha256) for p in entries])
        body = document(
            step,
            store.uri(step),
            store.uri(step),
            _config(),
            {"math": _result(step, step / 10)},
            {"math": 16},
            {},
            1.5,
        )
        storage.put_bytes(result_key(step), json.dumps(body).encode())
    assert store.prune(keep_last=1, protected=set()) == [2, 4]
    assert store.committed_steps() == [6]
    assert stored_steps(storage) == [2, 4, 6]  # pruning left every result file
    back = stored(storage, 2)
    assert back is not None and back["math"].accuracy == pytest.approx(0.2)
    raw = json.loads((tmp_path / "stage" / "evaluation" / "step-2.json").read_text())
    assert raw["checkpoint"].endswith("/step-2") and raw["datasets"]["math"]["rows"] == 16
    assert raw["settings"] == {"samples_per_prompt": 1, "temperature": 0.0, "top_p": 1.0}
    assert stored(storage, 8) is None
