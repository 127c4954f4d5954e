"""`LMMR1Run.status`: what the operator observed. Written only by the operator."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmmr1_operator.api.base import ApiModel
from lmmr1_operator.api.spec import RolloutMode

# Queued: a run with spec.queueName whose JobSet waits for Kueue's admission (or was evicted).
Phase = Literal["Pending", "Queued", "Running", "Suspended", "Succeeded", "Failed"]
StagePhase = Literal["Pending", "Running", "Succeeded", "Failed", "Skipped"]


class Condition(ApiModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(max_length=316, pattern=r"^([a-zA-Z0-9.-]+/)?[A-Za-z][A-Za-z0-9_]*$")
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(default="", max_length=32768)
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(default=None, ge=0)


class EvaluationPoint(ApiModel):
    """A held-out set measured at one step (step 0: the stage's starting weights)."""

    step: int = Field(ge=0)
    accuracy: float = Field(description="Mean accuracy over every sample.")
    pass_at_k: float | None = Field(
        default=None, description="Unbiased pass@k (k = evaluation.samplesPerPrompt > 1)."
    )
    k: int = Field(default=1, ge=1)
    format_rate: float | None = Field(
        default=None, description="Share of samples in the rewarded format."
    )
    response_length: float = Field(description="Mean generated tokens per sample.")
    prompts: int = Field(ge=0)


class DatasetEvaluationStatus(ApiModel):
    """One held-out set's results in a stage."""

    dataset: str = Field(max_length=63)
    baseline: EvaluationPoint | None = Field(
        default=None, description="The stage's starting weights, before its first step."
    )
    latest: EvaluationPoint | None = None
    final: EvaluationPoint | None = Field(default=None, description="After the last step.")
    gain: float | None = Field(
        default=None,
        description="Accuracy gained over the baseline: final's (latest's until then) minus "
        "baseline's.",
    )


class StageStatus(ApiModel):
    """One stage's record."""

    name: str = Field(max_length=63)
    phase: StagePhase = "Pending"
    start_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    step: int | None = Field(default=None, ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    reward: float | None = None
    accuracy: float | None = None
    initial_reward: float | None = Field(default=None, description="Mean reward at step 1.")
    init_checkpoint: str | None = Field(default=None, max_length=2048)
    final_checkpoint: str | None = Field(default=None, max_length=2048)
    restarts: int = Field(default=0, ge=0)
    disruptions: int = Field(
        default=0,
        ge=0,
        description="Restarts after Kubernetes ended a pod of the stage (a pod condition "
        "DisruptionTarget: preemption, eviction, a lost node); not counted in restarts.",
    )
    rollout_mode: RolloutMode | None = Field(
        default=None,
        description="Where the stage generates samples (spec's rollout.mode, resolved).",
    )
    rollout_engine: str | None = Field(
        default=None,
        max_length=128,
        description='What the trainer reports generating with, e.g. "vllm 0.32.0 cpu, colocate".',
    )
    skipped_rows: int | None = Field(
        default=None,
        ge=0,
        description="Dataset rows the pre-flight check left out (dataset.onBadRow: skip); "
        "the trainer's log names them.",
    )
    evaluation: list[DatasetEvaluationStatus] | None = Field(
        default=None,
        max_length=8,
        description="Held-out results per evaluation dataset (spec's evaluation).",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["dataset"],
        },
    )

    @property
    def attempt(self) -> int:
        """The stage's current attempt (its pods' lmmr1.io/attempt): every restart, a
        disruption's included, starts a new one."""
        return self.restarts + self.disruptions


class LMMR1RunStatus(ApiModel):
    """Observed state. `stage`/`step`/`reward` describe the stage that runs now."""

    phase: Phase | None = None
    stage: str | None = Field(default=None, max_length=63)
    stage_index: int | None = Field(default=None, ge=0)
    step: int | None = Field(default=None, ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    progress: str | None = Field(default=None, max_length=16, description='e.g. "45%".')
    reward: float | None = None
    accuracy: float | None = None
    tokens_per_second: float | None = None
    eval_accuracy: float | None = Field(
        default=None,
        description="The current stage's newest held-out accuracy (its first evaluation dataset).",
    )
    eval_gain: float | None = Field(
        default=None, description="That accuracy minus the stage's baseline."
    )
    last_checkpoint: str | None = Field(default=None, max_length=2048)
    restarts: int | None = Field(
        default=None, ge=0, description="Stage restarts counted against spec.backoffLimit."
    )
    disruptions: int | None = Field(
        default=None,
        ge=0,
        description="Stage restarts after Kubernetes ended a pod (a pod condition "
        "DisruptionTarget: preemption, eviction, a lost node); never counted against "
        "spec.backoffLimit.",
    )
    start_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    suspended_seconds: int | None = Field(
        default=None,
        ge=0,
        description="Seconds the run spent suspended (or queued by Kueue) before the "
        "current suspension; spec.activeDeadlineSeconds counts neither these nor the current "
        "one.",
    )
    suspended_since: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When the current suspension (or wait in Kueue's queue) began (unset "
        "while neither).",
    )
    last_progress_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When the operator last saw the current attempt's trainer make progress: "
        "a new progress report, or every trainer pod Running (the clock starts then, not "
        "while pods wait for a node or an image). The stall watchdog counts from here.",
    )
    last_report_time: str | None = Field(
        default=None,
        max_length=64,
        description="updatedAt of the trainer's last progress report (the trainer's clock); "
        "a report whose step or updatedAt differs is progress.",
    )
    retry_after: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="A restarting stage waits until then (exponential back-off).",
    )
    stages: list[StageStatus] = Field(default_factory=list, max_length=8)
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, ge=0)
