"""Invalid LMMR1Runs, each with the field the API server must name and what it must say.

Shared by the unit test (pydantic) and the integration test (the real API server), so the
two validators are held to the same table.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmmr1_testbed import runs

Run = dict[str, Any]


def valid_run(name: str = "valid") -> Run:
    return runs.run(
        name,
        storage={"uri": "s3://bucket/ckpt", "credentialsSecret": "s3-creds"},
        stages=runs.fre_then_mgt("s3://bucket/fre.jsonl", "s3://bucket/mgt.jsonl"),
    )


def _set(path: str, value: Any) -> Callable[[Run], None]:
    """A mutation setting `path` (dots, [i] indices) under the run, e.g. spec.stages[0].type."""

    def mutate(run: Run) -> None:
        node: Any = run
        parts = path.replace("[", ".").replace("]", "").split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        last = parts[-1]
        if value is _DELETE:
            del node[last]
        elif last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


_DELETE = object()


def _gae_critic(field: str, value: Any) -> Callable[[Run], None]:
    """A gae stage (the only kind with a critic) whose critic sets `field` to `value`."""

    def mutate(run: Run) -> None:
        _set("spec.stages[0].algorithm.advantageEstimator", "gae")(run)
        _set(f"spec.stages[0].critic.{field}", value)(run)

    return mutate


def _evaluating(**settings: Any) -> Callable[[Run], None]:
    """Stage 0 evaluates on one held-out set, with `settings` on top."""

    def mutate(run: Run) -> None:
        dataset = {"name": "heldout", "uri": "s3://bucket/heldout.jsonl"}
        run["spec"]["stages"][0]["evaluation"] = {"datasets": [dataset], **settings}

    return mutate


def _evaluating_unscored(run: Run) -> None:
    """Stage 0 evaluates, but its reward gives accuracy no weight."""
    _evaluating()(run)
    _set("spec.stages[0].reward.accuracyWeight", 0)(run)


EVAL = "spec.stages[0].evaluation"
ALGO = "spec.stages[0].algorithm"
RESOURCES = "spec.stages[0].resources"


@dataclass(frozen=True)
class Invalid:
    id: str
    mutate: Callable[[Run], None]
    field: str  # as the API server names it
    says: str  # a fragment of the API server's message
    pydantic: bool = True  # pydantic sees it too (not a transition or metadata rule)

    def run(self, name: str) -> Run:
        run = valid_run(name)
        self.mutate(run)
        return run


def _dup_stage(run: Run) -> None:
    run["spec"]["stages"][1]["name"] = "fre"


def _nine_stages(run: Run) -> None:
    base = run["spec"]["stages"][0]
    run["spec"]["stages"] = [{**copy.deepcopy(base), "name": f"s{i}"} for i in range(9)]


INVALID: list[Invalid] = [
    Invalid(
        "wrong-type",
        _set(f"{ALGO}.samplesPerPrompt", "sixteen"),
        f"{ALGO}.samplesPerPrompt",
        "must be of type integer",
    ),
    Invalid(
        "negative-gpus",
        _set("spec.stages[0].resources.trainer.gpusPerNode", -1),
        "spec.stages[0].resources.trainer.gpusPerNode",
        "greater than or equal to 0",
    ),
    Invalid(
        "too-many-gpus",
        _set("spec.stages[0].resources.rollout.gpusPerReplica", 64),
        "spec.stages[0].resources.rollout.gpusPerReplica",
        "less than or equal to 16",
    ),
    Invalid(
        "unknown-algorithm",
        _set(f"{ALGO}.advantageEstimator", "ppo2"),
        f"{ALGO}.advantageEstimator",
        'Unsupported value: "ppo2"',
    ),
    Invalid("duplicate-stage-names", _dup_stage, "spec.stages", "stage names must be unique"),
    Invalid(
        "bad-model-uri",
        _set("spec.model.uri", "ftp://models/qwen"),
        "spec.model.uri",
        "must be a URI starting with s3://, hf://, pvc://",
    ),
    Invalid(
        "bad-storage-scheme",
        _set("spec.storage.uri", "hf://org/bucket"),
        "spec.storage.uri",
        "must be a URI starting with s3://",
    ),
    Invalid(
        "bad-dataset-uri",
        _set("spec.stages[1].dataset.uri", "/data/mgt.jsonl"),
        "spec.stages[1].dataset.uri",
        "must be a URI starting with",
    ),
    Invalid(
        "image-root-path",
        _set("spec.stages[1].dataset.imageRoot", "/data/images"),
        "spec.stages[1].dataset.imageRoot",
        "must be a URI starting with s3://, pvc:// (for example pvc://images/geo3k)",
    ),
    Invalid(
        "pvc-claim-not-a-dns-name",
        _set("spec.stages[1].dataset.uri", "pvc://My_Claim/mgt.jsonl"),
        "spec.stages[1].dataset.uri",
        "names a PersistentVolumeClaim of the run's namespace",
    ),
    Invalid(
        "unknown-bad-row-policy",
        _set("spec.stages[1].dataset.onBadRow", "ignore"),
        "spec.stages[1].dataset.onBadRow",
        'Unsupported value: "ignore"',
    ),
    Invalid(
        "missing-dataset",
        _set("spec.stages[0].dataset", _DELETE),
        "spec.stages[0].dataset",
        "Required value",
    ),
    Invalid("missing-model", _set("spec.model", _DELETE), "spec.model", "Required value"),
    Invalid(
        "oversize-samples",
        _set(f"{ALGO}.samplesPerPrompt", 1000),
        f"{ALGO}.samplesPerPrompt",
        "less than or equal to 256",
    ),
    Invalid("no-stages", _set("spec.stages", []), "spec.stages", "at least 1 items"),
    Invalid("nine-stages", _nine_stages, "spec.stages", "at most 8 items"),
    Invalid(
        "stage-name-pattern",
        _set("spec.stages[0].name", "FRE_1"),
        "spec.stages[0].name",
        "should match",
    ),
    Invalid(
        "stage-name-too-long",
        _set("spec.stages[0].name", "f" * 15),
        "spec.stages[0].name",
        "may not be more than 14",
    ),
    Invalid(
        "unknown-stage-type",
        _set("spec.stages[0].type", "audio"),
        "spec.stages[0].type",
        'Unsupported value: "audio"',
    ),
    Invalid(
        "rollout-not-divisible",
        lambda r: [
            _set(f"{ALGO}.rolloutBatchSize", 3)(r),
            _set(f"{ALGO}.samplesPerPrompt", 2)(r),
            _set(f"{ALGO}.trainBatchSize", 4)(r),
            _set(f"{ALGO}.microTrainBatchSize", 2)(r),
        ],
        f"{ALGO}.trainBatchSize",
        "must be a multiple of trainBatchSize",
    ),
    Invalid(
        "micro-batch-not-dividing",
        _set(f"{ALGO}.microTrainBatchSize", 3),
        f"{ALGO}.microTrainBatchSize",
        "must divide trainBatchSize",
    ),
    Invalid(
        "baseline-needs-a-group",
        _set(f"{ALGO}.samplesPerPrompt", 1),
        f"{ALGO}.samplesPerPrompt",
        "need samplesPerPrompt >= 2",
    ),
    Invalid(
        "critic-without-gae",
        _set("spec.stages[0].critic", {"learningRate": 9e-6}),
        "spec.stages[0].critic",
        "only algorithm.advantageEstimator gae trains a critic",
    ),
    Invalid(
        "critic-learning-rate-zero",
        _gae_critic("learningRate", 0),
        "spec.stages[0].critic.learningRate",
        "should be greater than 0",
    ),
    Invalid(
        "critic-gae-lambda-above-one",
        _gae_critic("gaeLambda", 1.5),
        "spec.stages[0].critic.gaeLambda",
        "should be less than or equal to 1",
    ),
    Invalid(
        "tensor-parallel-not-dividing",
        lambda r: [
            _set("spec.stages[0].resources.rollout.mode", "separate")(r),
            _set("spec.stages[0].resources.rollout.gpusPerReplica", 4)(r),
            _set("spec.stages[0].resources.rollout.tensorParallelSize", 3)(r),
        ],
        "spec.stages[0].resources.rollout.tensorParallelSize",
        "must divide gpusPerReplica",
    ),
    Invalid(
        # One trainer node: the rollout mode defaults to colocate.
        "tensor-parallel-colocated",
        lambda r: [
            _set(f"{RESOURCES}.rollout.gpusPerReplica", 2)(r),
            _set(f"{RESOURCES}.rollout.tensorParallelSize", 2)(r),
        ],
        f"{RESOURCES}.rollout.tensorParallelSize",
        "must be 1 in colocate mode",
    ),
    Invalid(
        "transformers-colocated",
        lambda r: [
            _set(f"{RESOURCES}.trainer.nodes", 2)(r),
            _set(f"{RESOURCES}.rollout.mode", "colocate")(r),
            _set(f"{RESOURCES}.rollout.backend", "transformers")(r),
        ],
        f"{RESOURCES}.rollout.backend",
        "colocate mode needs vllm",
    ),
    Invalid(
        "unknown-rollout-mode",
        _set(f"{RESOURCES}.rollout.mode", "remote"),
        f"{RESOURCES}.rollout.mode",
        'Unsupported value: "remote"',
    ),
    Invalid("unknown-field", _set(f"{ALGO}.lr", 0.1), f"{ALGO}.lr", "unknown field"),
    Invalid(
        "zero-learning-rate",
        _set(f"{ALGO}.learningRate", 0),
        f"{ALGO}.learningRate",
        "greater than 0",
    ),
    Invalid(
        "temperature-too-high",
        _set(f"{ALGO}.temperature", 5),
        f"{ALGO}.temperature",
        "less than or equal to 2",
    ),
    Invalid(
        "bad-endpoint",
        _set("spec.storage.endpoint", "ftp://minio:9000"),
        "spec.storage.endpoint",
        "should match",
    ),
    Invalid(
        "bad-secret-name",
        _set("spec.storage.credentialsSecret", "S3_Creds"),
        "spec.storage.credentialsSecret",
        "should match",
    ),
    Invalid(
        "wandb-online-without-api-key",
        _set("spec.tracking", {"wandb": {"project": "lmmr1"}}),
        "spec.tracking.wandb.apiKeySecret",
        "online mode needs apiKeySecret",
    ),
    Invalid(
        "mlflow-uri-without-scheme",
        _set("spec.tracking", {"mlflow": {"trackingUri": "mlflow.mlflow.svc:5000"}}),
        "spec.tracking.mlflow.trackingUri",
        "should match",
    ),
    Invalid(
        "negative-sample-table-interval",
        _set("spec.tracking", {"logSamplesEverySteps": -1}),
        "spec.tracking.logSamplesEverySteps",
        "greater than or equal to 0",
    ),
    Invalid(
        "negative-backoff",
        _set("spec.backoffLimit", -1),
        "spec.backoffLimit",
        "greater than or equal to 0",
    ),
    Invalid(
        "negative-stall-timeout",
        _set("spec.stallTimeoutSeconds", -1),
        "spec.stallTimeoutSeconds",
        "greater than or equal to 0",
    ),
    Invalid(
        "stage-stall-timeout-over-a-day",
        _set("spec.stages[1].stallTimeoutSeconds", 86_401),
        "spec.stages[1].stallTimeoutSeconds",
        "less than or equal to 86400",
    ),
    Invalid(
        "unknown-prompt-template",
        _set("spec.stages[0].reward.promptTemplate", "jinja"),
        "spec.stages[0].reward.promptTemplate",
        'Unsupported value: "jinja"',
    ),
    Invalid(
        "unknown-reward-profile",
        _set("spec.stages[0].reward.profile", "reference"),
        "spec.stages[0].reward.profile",
        'Unsupported value: "reference"',
    ),
    Invalid(
        "unknown-unparseable-label-rule",
        _set("spec.stages[1].reward.unparseableLabel", "half"),
        "spec.stages[1].reward.unparseableLabel",
        'Unsupported value: "half"',
    ),
    Invalid(
        "zero-stage-4", _set(f"{ALGO}.zeroStage", 4), f"{ALGO}.zeroStage", "Unsupported value: 4"
    ),
    Invalid(
        "freeze-prefix-trailing-dot",
        _set(f"{ALGO}.freezePrefix", ["visual."]),
        f"{ALGO}.freezePrefix[0]",
        "should match",
    ),
    Invalid(
        "freeze-prefix-too-many",
        _set(f"{ALGO}.freezePrefix", [f"model.layers.{i}" for i in range(17)]),
        f"{ALGO}.freezePrefix",
        "must have at most 16 items",
    ),
    Invalid(
        "bad-shm-quantity",
        _set("spec.stages[0].resources.trainer.shmSize", "lots"),
        "spec.stages[0].resources.trainer.shmSize",
        "should match",
    ),
    Invalid(
        "warmup-above-one",
        _set(f"{ALGO}.warmupRatio", 1.5),
        f"{ALGO}.warmupRatio",
        "less than or equal to 1",
    ),
    Invalid(
        "node-selector-not-string",
        _set("spec.nodeSelector", {"gpu": 1}),
        "spec.nodeSelector.gpu",
        "must be of type string",
    ),
    Invalid(
        "evaluation-dataset-names-repeat",
        _evaluating(
            datasets=[
                {"name": "math", "uri": "s3://bucket/a.jsonl"},
                {"name": "math", "uri": "s3://bucket/b.jsonl"},
            ]
        ),
        f"{EVAL}.datasets",
        "evaluation dataset names must be unique",
    ),
    Invalid(
        "evaluation-pass-at-k-greedy",
        _evaluating(samplesPerPrompt=8),
        f"{EVAL}.temperature",
        "set temperature > 0 for pass@k",
    ),
    Invalid(
        "evaluation-without-datasets",
        _evaluating(datasets=[]),
        f"{EVAL}.datasets",
        "at least 1 items",
    ),
    Invalid(
        "evaluation-dataset-bad-name",
        _evaluating(datasets=[{"name": "Math_500", "uri": "s3://bucket/a.jsonl"}]),
        f"{EVAL}.datasets[0].name",
        "should match",
    ),
    Invalid(
        "evaluation-dataset-bad-uri",
        _evaluating(datasets=[{"name": "math", "uri": "/data/heldout.jsonl"}]),
        f"{EVAL}.datasets[0].uri",
        "must be a URI starting with s3://",
    ),
    Invalid(
        "evaluation-every-zero-steps",
        _evaluating(everySteps=0),
        f"{EVAL}.everySteps",
        "greater than or equal to 1",
    ),
    Invalid(
        "evaluation-without-accuracy",
        _evaluating_unscored,
        "spec.stages[0].evaluation",
        "reward.accuracyWeight 0 leaves unscored",
    ),
    Invalid(
        "run-name-too-long",
        _set("metadata.name", "r" * 37),
        "",
        "metadata.name must be at most 36 characters",
        pydantic=False,
    ),
]


@dataclass(frozen=True)
class ImmutableChange:
    id: str
    mutate: Callable[[Run], None]
    field: str
    says: str = "cannot change once the run exists"


IMMUTABLE: list[ImmutableChange] = [
    ImmutableChange(
        "model-changed", _set("spec.model.uri", "hf://Qwen/Qwen2.5-VL-7B-Instruct"), "spec.model"
    ),
    ImmutableChange("storage-changed", _set("spec.storage.uri", "s3://other/ckpt"), "spec.storage"),
    ImmutableChange(
        "stage-hyperparameter-changed", _set(f"{ALGO}.learningRate", 1e-5), "spec.stages"
    ),
    ImmutableChange(
        "stage-added",
        lambda r: r["spec"]["stages"].append(
            {"name": "extra", "type": "text", "dataset": {"uri": "s3://b/x.jsonl"}}
        ),
        "spec.stages",
    ),
]
