"""Held-out evaluation in the run's status: the trainer's report (`Progress.evaluation`) as
`status.stages[].evaluation`, with each set's gain over the stage's starting point."""

from __future__ import annotations

from lmmr1_operator.api.status import DatasetEvaluationStatus, EvaluationPoint
from lmmr1_trainer.config import DatasetEvaluation, EvaluationResult


def gain(entry: DatasetEvaluation) -> float | None:
    """Accuracy gained over the baseline: the final result's, the latest's until then; None
    without a baseline (evaluation.beforeTraining false) or before any later result."""
    end = entry.final or entry.latest
    if entry.baseline is None or end is None or end.step == entry.baseline.step:
        return None
    return end.accuracy - entry.baseline.accuracy


def _point(result: EvaluationResult | None) -> EvaluationPoint | None:
    return None if result is None else EvaluationPoint.model_validate(result.model_dump())


def stage_evaluation(report: dict[str, DatasetEvaluation] | None) -> list[DatasetEvaluationStatus]:
    """The status entries, one per set, in the report's order."""
    return [
        DatasetEvaluationStatus(
            dataset=name,
            baseline=_point(entry.baseline),
            latest=_point(entry.latest),
            final=_point(entry.final),
            gain=gain(entry),
        )
        for name, entry in (report or {}).items()
    ]


def headline(entries: list[DatasetEvaluationStatus]) -> tuple[float | None, float | None]:
    """(newest accuracy, gain) of the first set: the run's `Eval` and `Eval-Gain` columns."""
    if not entries or entries[0].latest is None:
        return None, None
    return entries[0].latest.accuracy, entries[0].gain
