"""Held-out evaluation on the operator's side: the API section renders into the stage
config with its defaults resolved, the trainer's report reaches the status with each set's
gain (and the run's Eval columns), and the metrics endpoint exposes it."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest
from tests.invalid_runs import valid_run
from tests.unit.test_operator_reconcile import SETTINGS, pod, seen, stage_yaml, started

from lmmr1_operator.api import crd
from lmmr1_operator.api.spec import LMMR1RunSpec
from lmmr1_operator.metrics import Metrics
from lmmr1_operator.reconcile import decide
from lmmr1_trainer.config import DatasetEvaluation, EvaluationResult, Progress, StageConfig


def _evaluated_run() -> dict[str, Any]:
    run = valid_run("r")
    run["metadata"].update(namespace="ns", uid="uid-1", generation=1)
    stage = run["spec"]["stages"][0]
    stage["checkpoint"] = {"everySteps": 5}
    stage["evaluation"] = {
        "datasets": [
            {"name": "math", "uri": "s3://bucket/math500.jsonl", "maxSamples": 32},
            {"name": "geo", "uri": "s3://bucket/geo-test.jsonl", "type": "multimodal"},
        ],
        "samplesPerPrompt": 4,
        "temperature": 0.6,
    }
    return run


def test_the_evaluation_section_renders_with_its_defaults_resolved() -> None:
    run = _evaluated_run()
    spec = LMMR1RunSpec.model_validate(run["spec"])
    assert spec.stages[1].evaluation is None  # optional: no section, no evaluation
    config = StageConfig.model_validate(stage_yaml(decide(seen(run), SETTINGS)))
    evaluation = config.evaluation
    assert evaluation is not None
    assert evaluation.every_steps == 5  # unset: the stage's checkpoint.everySteps
    assert [(d.name, d.type, d.max_samples) for d in evaluation.datasets] == [
        ("math", "text", 32),  # unset: the stage's type
        ("geo", "multimodal", None),
    ]
    assert (evaluation.samples_per_prompt, evaluation.temperature) == (4, 0.6)
    assert evaluation.before_training


def test_a_stage_without_evaluation_renders_none() -> None:
    _, plan = started()
    assert stage_yaml(plan)["evaluation"] is None


def test_the_crd_leaves_evaluation_unset_and_shows_it_in_wide_output() -> None:
    schema = crd.crd()["spec"]["versions"][0]
    stage = schema["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["stages"]
    assert "default" not in stage["items"]["properties"]["evaluation"]
    wide = {c["name"]: c for c in schema["additionalPrinterColumns"]}
    assert wide["Eval"]["jsonPath"] == ".status.evalAccuracy" and wide["Eval"]["priority"] == 1
    assert wide["Eval-Gain"]["jsonPath"] == ".status.evalGain"


def _result(step: int, accuracy: float, **more: Any) -> EvaluationResult:
    return EvaluationResult(step=step, accuracy=accuracy, response_length=12.5, prompts=32, **more)


def _progress(step: int, evaluation: dict[str, DatasetEvaluation]) -> Progress:
    return Progress(
        stage="fre",
        step=step,
        total_steps=10,
        evaluation=evaluation,
        updated_at=f"2026-01-01T12:00:{step:02d}Z",
    )


def test_evaluation_reaches_the_status_with_its_gain() -> None:
    run, _ = started()
    trainer = [pod("t", container="trainer")]
    baseline = {"math": DatasetEvaluation(baseline=_result(0, 0.25), latest=_result(0, 0.25))}
    plan = decide(seen(run, progress=_progress(0, baseline), trainer_pods=trainer), SETTINGS)
    (entry,) = plan.status["stages"][0]["evaluation"]
    assert entry["dataset"] == "math" and entry["baseline"]["accuracy"] == 0.25
    assert "gain" not in entry  # nothing measured after the baseline yet
    assert plan.status["evalAccuracy"] == 0.25 and plan.status["evalGain"] is None

    middle = {
        "math": DatasetEvaluation(
            baseline=_result(0, 0.25), latest=_result(4, 0.5, pass_at_k=0.75, k=4)
        )
    }
    plan = decide(seen(run, progress=_progress(4, middle), trainer_pods=trainer), SETTINGS)
    (entry,) = plan.status["stages"][0]["evaluation"]
    assert entry["latest"] == {
        "step": 4,
        "accuracy": 0.5,
        "passAtK": 0.75,
        "k": 4,
        "responseLength": 12.5,
        "prompts": 32,
    }
    assert entry["gain"] == pytest.approx(0.25)
    assert plan.status["evalGain"] == pytest.approx(0.25)

    done = {
        "math": DatasetEvaluation(
            baseline=_result(0, 0.25), latest=_result(10, 0.2), final=_result(10, 0.2)
        )
    }
    plan = decide(seen(run, progress=_progress(10, done), trainer_pods=trainer), SETTINGS)
    (entry,) = plan.status["stages"][0]["evaluation"]
    assert entry["final"]["step"] == 10
    assert entry["gain"] == pytest.approx(-0.05)  # a loss shows as one


def _status_stage(point: dict[str, Any], gain: float | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"dataset": "math", "baseline": {"step": 0, "accuracy": 0.25,
        "responseLength": 9.0, "prompts": 16}, "latest": point}  # fmt: skip
    if gain is not None:
        entry["gain"] = gain
    return {"name": "fre", "evaluation": [entry]}


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_metrics_expose_each_point_and_the_gain_then_forget_the_run() -> None:
    metrics = Metrics()
    latest = {"step": 4, "accuracy": 0.5, "passAtK": 0.8, "k": 4, "formatRate": 1.0,
              "responseLength": 11.0, "prompts": 16}  # fmt: skip
    metrics.observe_evaluation("ns", "r", [_status_stage(latest, 0.25), {"name": "mgt"}])
    labels = {"namespace": "ns", "run": "r", "stage": "fre", "dataset": "math"}
    assert _sample(metrics, "lmmr1_evaluation_accuracy", **labels, point="baseline") == 0.25
    assert _sample(metrics, "lmmr1_evaluation_accuracy", **labels, point="latest") == 0.5
    assert _sample(metrics, "lmmr1_evaluation_pass_at_k", **labels, point="latest") == 0.8
    assert _sample(metrics, "lmmr1_evaluation_step", **labels, point="latest") == 4
    assert _sample(metrics, "lmmr1_evaluation_gain", **labels) == 0.25
    assert _sample(metrics, "lmmr1_evaluation_accuracy", **labels, point="final") is None
    # A status without the gain drops its series; a forgotten run drops everything.
    metrics.observe_evaluation("ns", "r", [_status_stage(latest, None)])
    assert _sample(metrics, "lmmr1_evaluation_gain", **labels) is None
    metrics.forget("ns", "r")
    assert b"lmmr1_evaluation_accuracy{" not in generate_latest(metrics.registry)
