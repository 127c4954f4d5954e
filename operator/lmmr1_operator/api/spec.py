"""`LMMR1Run.spec`: what the user asks for. Defaults are the LMM-R1 paper's FRE recipe.

Every field carries its bounds; cross-field rules are `Rule`s (CEL for the API server, the
same check for pydantic). See docs/api.md (generated) for the reference.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, JsonValue, model_validator

from lmmr1_operator.api.base import NO_DEFAULT, ApiModel, Rule

# The verifier owns its contract; its config module is pure pydantic (no torch).
from lmmr1_trainer.verifier.config import PromptTemplate, RewardProfile, UnparseableLabelPolicy

MAX_URI = 1024
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
QUANTITY_PATTERN = r"^([+]?[0-9.]+)([eE][+]?[0-9]+|Ki|[MGTPE]i?|k|m)?$"
# The stall watchdog's default: the first report of a stage comes only after the model's
# download, DeepSpeed's and vLLM's start and a whole first step (for the paper's 3B model on
# 8 GPUs: minutes each, and tens of minutes for a slow hub download or a step that writes a
# checkpoint), and every later one after a step plus, every checkpoint.everySteps steps,
# the upload of the model and optimizer state (tens of GiB).
DEFAULT_STALL_TIMEOUT_S = 1800
MAX_STALL_TIMEOUT_S = 86_400
DEFAULT_SCRATCH_SIZE = "256Gi"


# A PersistentVolumeClaim's name (a DNS subdomain): `pvc://<claim>/<path>` mounts the claim
# into the stage's pods at <pvc root>/<claim>.
_CLAIM = "[a-z0-9]([-a-z0-9.]*[a-z0-9])?"


def _uri_pattern(schemes: tuple[str, ...]) -> str:
    # No backslashes: the same text is a CEL string literal.
    others = [s for s in schemes if s != "pvc"]
    head = f"({'|'.join(others)})://[^/ ]+"
    if "pvc" in schemes:
        head = f"({head}|pvc://{_CLAIM})" if others else f"pvc://{_CLAIM}"
    return rf"^{head}(/[^ ]*)?$"


def _uri_message(schemes: tuple[str, ...], example: str) -> str:
    listed = ", ".join(f"{s}://" for s in schemes)
    claim = (
        "; pvc://claim/path names a PersistentVolumeClaim of the run's namespace (a lower-case "
        "DNS name), mounted read-only into the stage's pods"
        if "pvc" in schemes
        else ""
    )
    return f"must be a URI starting with {listed} (for example {example}){claim}"


def _uri_check(schemes: tuple[str, ...], example: str) -> AfterValidator:
    """pydantic's half of the scheme rule."""

    def check(value: str) -> str:
        if not re.match(_uri_pattern(schemes), value):
            raise ValueError(_uri_message(schemes, example))
        return value

    return AfterValidator(check)


def _uri_field(schemes: tuple[str, ...], example: str, description: str) -> Any:
    """The API server's half: the same rule as CEL, with the same message."""
    rule: dict[str, JsonValue] = {
        "rule": f"self.matches('{_uri_pattern(schemes)}')",
        "message": _uri_message(schemes, example),
    }
    return Field(
        max_length=MAX_URI,
        description=description,
        json_schema_extra={"x-kubernetes-validations": [rule]},
    )


_MODEL = (("s3", "hf", "pvc"), "hf://Qwen/Qwen2.5-VL-3B-Instruct")
_STORAGE = (("s3",), "s3://my-bucket/lmmr1")
_DATASET = (("s3", "hf", "pvc"), "s3://my-bucket/data/deepscaler.jsonl")
_CHECKPOINT = (("s3", "hf", "pvc"), "s3://my-bucket/lmmr1/ns/run/fre/step-40")
_IMAGE_ROOT = (("s3", "pvc"), "pvc://images/geo3k")
ModelUri = Annotated[
    str,
    _uri_check(*_MODEL),
    _uri_field(
        *_MODEL, "Where the weights are: s3://bucket/path, hf://org/name or pvc://claim/path."
    ),
]
StorageUri = Annotated[
    str,
    _uri_check(*_STORAGE),
    _uri_field(*_STORAGE, "Checkpoints go under <uri>/<namespace>/<run>/<uid>/<stage>/step-<N>/."),
]
DatasetUri = Annotated[
    str,
    _uri_check(*_DATASET),
    _uri_field(
        *_DATASET, "JSONL rows with a `message` chat list and an `answer`; s3://, hf:// or pvc://."
    ),
]
CheckpointUri = Annotated[
    str,
    _uri_check(*_CHECKPOINT),
    _uri_field(
        *_CHECKPOINT, "Start this stage from these weights instead of the previous stage's."
    ),
]
ImageRootUri = Annotated[
    str,
    _uri_check(*_IMAGE_ROOT),
    _uri_field(
        *_IMAGE_ROOT,
        "Where the rows' relative image paths (img/1.png, file://img/1.png) are: "
        "s3://bucket/prefix or pvc://claim/dir. Default: the dataset file's folder. "
        "Absolute paths and s3:// or data: images in the rows are used as they are.",
    ),
]
Quantity = Annotated[
    str,
    Field(
        pattern=QUANTITY_PATTERN,
        max_length=32,
        description="A Kubernetes quantity, e.g. 16Gi or 500m.",
    ),
]
DnsName = Annotated[str, Field(pattern=NAME_PATTERN, min_length=1, max_length=63)]
# A dotted prefix of parameter names: `visual`, `model.layers.0`, `model.language_model`.
ParameterPrefix = Annotated[
    str,
    Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$", min_length=1, max_length=256),
]
# Child names (also hostnames and label values, so DNS labels of at most 63 characters)
# carry the stage's attempt modulo 1000 (lmmr1_operator.naming): rollout pods are
# <run>-<stage>-r<attempt>-<replica>, the trainer Job <run>-<stage>-t<attempt> and its pods'
# hostnames <run>-<stage>-t<attempt>-<index>. A run name of at most 36 and a stage name of
# at most 14 characters leave room for a 3-digit attempt and 3-digit indices:
# 36 + 1 + 14 + 2 + 3 + 1 + 3 = 60.
MAX_STAGE_NAME = 14
StageName = Annotated[
    str,
    Field(
        pattern=NAME_PATTERN,
        min_length=1,
        max_length=MAX_STAGE_NAME,
        description="Lower-case DNS label, unique in the run (e.g. fre, mgt).",
    ),
]


class ModelSource(ApiModel):
    """The base model the first stage starts from."""

    uri: ModelUri
    revision: str | None = Field(
        default=None, max_length=128, description="Hub revision (branch, tag or commit) for hf://."
    )


class Storage(ApiModel):
    """Where checkpoints are written. Without `credentialsSecret` the pods use their
    service account's identity (IRSA / workload identity)."""

    uri: StorageUri
    endpoint: str | None = Field(
        default=None,
        max_length=MAX_URI,
        pattern=r"^https?://[^/ ]+(/[^ ]*)?$",
        description="S3-compatible endpoint URL; omit for AWS S3.",
    )
    region: str | None = Field(default=None, max_length=64, description="S3 region.")
    credentials_secret: DnsName | None = Field(
        default=None,
        description="Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.",
    )


class Dataset(ApiModel):
    """A stage's training data."""

    uri: DatasetUri
    prompt_key: str = Field(
        default="message",
        min_length=1,
        max_length=64,
        description="Row field with the JSON-encoded chat list.",
    )
    label_key: str = Field(
        default="answer",
        min_length=1,
        max_length=64,
        description="Row field with the reference answer.",
    )
    image_root: ImageRootUri | None = None
    max_samples: int | None = Field(
        default=None, ge=1, le=100_000_000, description="Use only the first N rows."
    )
    on_bad_row: Literal["fail", "skip"] = Field(
        default="fail",
        description="What the pre-flight check (every row parsed, every image decoded, every "
        "prompt within algorithm.maxPromptLength, before the first step) does with a bad "
        "row: fail (the stage fails at once, naming up to 10 rows by file:line and field) or "
        "skip (train without them; status.stages[].skippedRows counts them).",
    )


DatasetName = Annotated[
    str,
    Field(
        pattern=NAME_PATTERN,
        min_length=1,
        max_length=63,
        description="Lower-case DNS label, unique in the stage's evaluation (e.g. mathvista): "
        "the key of its results in status, metrics and S3.",
    ),
]


class EvaluationDataset(Dataset):
    """A held-out set, in the training data's row format."""

    name: DatasetName
    type: Literal["text", "multimodal"] | None = Field(
        default=None, description="text or multimodal; unset: the stage's type."
    )
    on_bad_row: Literal["fail", "skip"] = Field(
        default="fail",
        description="What the pre-flight check does with a bad row of this set: fail (the "
        "stage fails before its first step, naming the set and up to 10 rows) or skip "
        "(evaluate on the good rows; the result file counts the skipped ones). A set that "
        "cannot be read at all always fails the stage.",
    )


# Why the middle evaluations follow the checkpoints by default: each result then measures
# weights that are kept in storage (its JSON sits beside that checkpoint), so a number can
# be reproduced or its checkpoint picked; and a run already pays for a pause at that cadence.
class Evaluation(ApiModel):
    """Held-out evaluation of the stage's policy ([eval_steps], val_before_train): sampled
    with the stage's own engines, scored by its verifier and reward settings, before the
    first step (the baseline), every everySteps steps, and after the last step."""

    rules = (
        Rule(
            cel="self.datasets.all(d, self.datasets.exists_one(e, e.name == d.name))",
            message="evaluation dataset names must be unique",
            check=lambda e: len({d.name for d in e.datasets}) == len(e.datasets),
            field="datasets",
        ),
        Rule(
            cel="self.samplesPerPrompt == 1 || self.temperature > 0.0",
            message="greedy decoding (temperature 0) draws one answer per prompt: set "
            "temperature > 0 for pass@k with samplesPerPrompt > 1",
            check=lambda e: e.samples_per_prompt == 1 or e.temperature > 0,
            field="temperature",
        ),
    )

    datasets: list[EvaluationDataset] = Field(min_length=1, max_length=8)
    every_steps: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Evaluate after every N steps [eval_steps]; unset: checkpoint.everySteps, "
        "so each result measures a checkpoint that is kept. The last step is always "
        "evaluated.",
    )
    before_training: bool = Field(
        default=True,
        description="Measure the stage's starting weights before the first step (the "
        "baseline every gain is counted from) [val_before_train]. A resumed stage reads the "
        "stored baseline back instead of measuring again.",
    )
    samples_per_prompt: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Answers per prompt; more than 1 reports pass@k (k = this number, the "
        "unbiased estimator) besides the mean accuracy.",
    )
    temperature: float = Field(default=0.0, ge=0, le=2, description="0 (default): greedy decoding.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling.")


class Algorithm(ApiModel):
    """RL hyperparameters. Defaults: the paper's FRE stage (OpenRLHF names in brackets)."""

    rules = (
        Rule(
            cel="(self.rolloutBatchSize * self.samplesPerPrompt) % self.trainBatchSize == 0",
            message="rolloutBatchSize x samplesPerPrompt must be a multiple of trainBatchSize "
            "(each rollout batch is split into whole training batches)",
            check=lambda a: (a.rollout_batch_size * a.samples_per_prompt) % a.train_batch_size == 0,
            field="trainBatchSize",
        ),
        Rule(
            cel="self.trainBatchSize % self.microTrainBatchSize == 0",
            message="must divide trainBatchSize",
            check=lambda a: a.train_batch_size % a.micro_train_batch_size == 0,
            field="microTrainBatchSize",
        ),
        Rule(
            cel="self.advantageEstimator == 'gae' || self.samplesPerPrompt >= 2",
            message="group-baseline estimators (reinforce_baseline, grpo, rloo) need "
            "samplesPerPrompt >= 2",
            check=lambda a: a.advantage_estimator == "gae" or a.samples_per_prompt >= 2,
            field="samplesPerPrompt",
        ),
    )

    advantage_estimator: Literal["reinforce_baseline", "grpo", "rloo", "gae"] = Field(
        default="reinforce_baseline",
        description="reinforce_baseline (paper): group-mean baseline, then batch whitening.",
    )
    samples_per_prompt: int = Field(
        default=16, ge=1, le=256, description="Responses sampled per prompt [n_samples_per_prompt]."
    )
    rollout_batch_size: int = Field(
        default=256, ge=1, le=65536, description="Prompts per rollout [rollout_batch_size]."
    )
    train_batch_size: int = Field(
        default=256,
        ge=1,
        le=1_048_576,
        description="Samples per optimizer step [train_batch_size].",
    )
    micro_train_batch_size: int = Field(
        default=2,
        ge=1,
        le=1024,
        description="Samples per forward/backward per GPU [micro_train_batch_size] (the "
        "scripts: 2, and 1 with 8k-token generation).",
    )
    epochs_per_rollout: int = Field(
        default=1, ge=1, le=16, description="Passes over each rollout batch [max_epochs]."
    )
    episodes: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="Passes over the dataset [num_episodes] (every LMM-R1 script: 2).",
    )
    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Stop the stage after this many steps. A step is one rollout batch "
        "(rolloutBatchSize prompts, then rolloutBatchSize x samplesPerPrompt x epochsPerRollout"
        " / trainBatchSize optimizer updates): what status.step counts, checkpoint.everySteps "
        "and OpenRLHF's --save_steps count.",
    )
    learning_rate: float = Field(
        default=4e-7, gt=0, le=1.0, description="Peak learning rate (paper: 4e-7 FRE, 1e-6 MGT)."
    )
    warmup_ratio: float = Field(default=0.03, ge=0, le=1, description="Linear warm-up share.")
    min_lr_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Cosine decay floor as a share of the peak."
    )
    kl_coef: float = Field(default=0.001, ge=0, le=10, description="KL to the reference model.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(default="k1", description="KL estimator.")
    kl_in_reward: bool = Field(
        default=True,
        description="true (paper): KL as a per-token reward penalty; false: a loss term.",
    )
    clip_range: float = Field(default=0.2, gt=0, le=1, description="PPO clip epsilon.")
    grad_clip: float = Field(default=1.0, gt=0, le=1000, description="Gradient norm clip.")
    temperature: float = Field(default=1.0, gt=0, le=2, description="Sampling temperature.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling.")
    max_prompt_length: int = Field(default=4096, ge=16, le=131072, description="Tokens.")
    max_generation_length: int = Field(default=4096, ge=1, le=131072, description="Tokens.")
    zero_stage: Literal[0, 1, 2, 3] = Field(default=3, description="DeepSpeed ZeRO stage.")
    bf16: bool = Field(default=True, description="bf16 training (GPU only).")
    gradient_checkpointing: bool = Field(default=True, description="Trade compute for memory.")
    freeze_prefix: list[ParameterPrefix] = Field(
        default_factory=list,
        max_length=16,
        description="Parameters that are not trained [freeze_prefix]: each entry is a "
        "dotted prefix of parameter names, matched whole components at a time (`model.layers.1` "
        "is layer 1, not layer 10), against the names in the model's checkpoint files (those "
        "OpenRLHF and LMM-R1 use: for Qwen2.5-VL `visual` is the vision tower with its merger, "
        "`model` the language model) and against transformers' own names (`model.visual`, "
        "`model.language_model`). A prefix that matches no parameter fails the stage at start, "
        "naming the model's prefixes. Frozen parameters get no optimizer state and keep their "
        "starting values; they are still in every checkpoint and sent to the rollout engines.",
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Data order and sampling.")


class Reward(ApiModel):
    """The rule-based reward (the verifier sidecar). Paper: format 0.5 + accuracy 1.0."""

    profile: RewardProfile = Field(
        default=RewardProfile.LMM_R1,
        description="The scoring rules. lmm-r1 (default): exactly the LMM-R1 reference reward "
        "server. strict: the reference's answer reading (whole response, boxed or $-delimited "
        "answers only) with no credit for unparseable labels and math-verify's documented "
        "verify(label, answer) order. lenient: strict, but the answer is read from the "
        "<answer> block, where a bare expression counts. See docs/verifier.md.",
    )
    verifier: str = Field(
        default="math",
        pattern=r"^[a-z][a-z0-9_.-]*$",
        max_length=64,
        description="Verifier task: math (default), choice, numeric, sokoban (LMM-R1's Sokoban "
        "reward: the label is the level, the answer's moves are replayed in it) or a "
        "registered plug-in name.",
    )
    format_weight: float = Field(default=0.5, ge=0, le=100)
    accuracy_weight: float = Field(default=1.0, ge=0, le=100)
    prompt_template: PromptTemplate = Field(
        default=PromptTemplate.CHATML,
        description="How the verifier finds the response in the chat-templated query.",
    )
    unparseable_label: UnparseableLabelPolicy | None = Field(
        default=None,
        description="Accuracy for labels that cannot be parsed: one or zero; unset: the "
        "profile's rule (lmm-r1: one, as the reference; strict and lenient: zero). Such "
        "samples are flagged either way.",
    )


class Critic(ApiModel):
    """PPO's critic, trained with advantageEstimator gae (the LMM-R1 scripts' MGT-Geo,
    Direct-RL and Sokoban stages): a value head on a copy of the stage's starting weights, in
    its own optimizer. A gae stage without this section gets these defaults; other
    estimators train no critic and refuse it."""

    learning_rate: float = Field(
        default=9e-6,
        gt=0,
        le=1.0,
        description="Peak learning rate [critic_learning_rate] (the scripts: 9e-6, Sokoban 5e-6).",
    )
    warmup_ratio: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Linear warm-up share; unset: algorithm.warmupRatio (OpenRLHF's one "
        "--lr_warmup_ratio serves both). The cosine decay floor is algorithm.minLrRatio.",
    )
    value_clip: float = Field(
        default=0.2,
        gt=0,
        le=100,
        description="How far a value may move from the rollout's before its error stops "
        "counting [value_clip].",
    )
    gamma: float = Field(default=1.0, ge=0, le=1, description="Discount [gamma].")
    gae_lambda: float = Field(default=1.0, ge=0, le=1, description="GAE lambda [lambd].")


class TrainerResources(ApiModel):
    """DeepSpeed training pods: one per node (an indexed Job)."""

    nodes: int = Field(default=1, ge=1, le=256)
    gpus_per_node: int = Field(default=8, ge=0, le=16, description="0 runs on CPU (tests).")
    cpu: Quantity | None = None
    memory: Quantity | None = None
    shm_size: Quantity = Field(default="16Gi", description="/dev/shm for NCCL and dataloaders.")
    scratch_size: Quantity = Field(
        default=DEFAULT_SCRATCH_SIZE,
        description="Each trainer pod's scratch volume (an emptyDir with this sizeLimit, and "
        "as much ephemeral-storage requested): where a node stages its checkpoint shards "
        "and a resume downloads them. The default fits the paper's 3B model on one 8-GPU "
        "node with a critic (two models x ~60 GB per checkpoint x 2 copies); the trainer "
        "checks the estimate for the real model at start and fails at once if it does "
        "not fit.",
    )


RolloutMode = Literal["colocate", "separate"]
_COLOCATE_ONLY = "unused in colocate mode (the trainer's pods generate)"


class RolloutResources(ApiModel):
    """Where samples are generated: vLLM inside every trainer rank (colocate) or rollout
    server pods (separate)."""

    rules = (
        Rule(
            cel="self.gpusPerReplica == 0 || self.gpusPerReplica % self.tensorParallelSize == 0",
            message="must divide gpusPerReplica",
            check=lambda r: (
                r.gpus_per_replica == 0 or r.gpus_per_replica % r.tensor_parallel_size == 0
            ),
            field="tensorParallelSize",
        ),
    )

    mode: RolloutMode | None = Field(
        default=None,
        description="colocate: every trainer rank runs its own vLLM engine and generates its "
        "share of the prompts (the paper's layout; no rollout pods). separate: rollout server "
        "pods (replicas x gpusPerReplica) that the operator starts before the trainer. Unset: "
        "colocate when the trainer fits one node (resources.trainer.nodes 1), separate "
        "otherwise; the resolved mode shows in status.stages[].rolloutMode.",
    )
    backend: Literal["vllm", "transformers"] = Field(
        default="vllm",
        description="vllm (GPU, or its CPU build on CPU). transformers: fallback for "
        "separate mode without vLLM; colocate needs vllm.",
    )
    replicas: int = Field(
        default=1, ge=1, le=256, description=f"Rollout server pods; {_COLOCATE_ONLY}."
    )
    gpus_per_replica: int = Field(
        default=1,
        ge=0,
        le=16,
        description=f"0: a CPU rollout server (tests); {_COLOCATE_ONLY}.",
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, le=16, description="GPUs per vLLM engine; 1 in colocate mode."
    )
    gpu_memory_utilization: float = Field(
        default=0.5,
        ge=0.05,
        le=0.98,
        description="Share of each GPU's memory for vLLM [vllm_gpu_memory_utilization] (in "
        "colocate mode: of the trainer's GPU; the scripts' 0.5).",
    )
    cpu: Quantity | None = Field(default=None, description=f"Per rollout pod; {_COLOCATE_ONLY}.")
    memory: Quantity | None = Field(default=None, description=f"Per rollout pod; {_COLOCATE_ONLY}.")


# The resolved mode in CEL; `resolved_rollout_mode` is the same in Python.
_CEL_ROLLOUT_MODE = (
    "(has(self.rollout.mode) ? self.rollout.mode : "
    "(self.trainer.nodes == 1 ? 'colocate' : 'separate'))"
)


def resolved_rollout_mode(resources: Resources) -> RolloutMode:
    """rollout.mode, or its default: colocate when the trainer fits one node."""
    if resources.rollout.mode is not None:
        return resources.rollout.mode
    return "colocate" if resources.trainer.nodes == 1 else "separate"


class Resources(ApiModel):
    """The stage's pods: the trainer's, and the rollout servers' in separate mode."""

    rules = (
        Rule(
            cel=f"{_CEL_ROLLOUT_MODE} != 'colocate' || self.rollout.tensorParallelSize == 1",
            message="must be 1 in colocate mode (each trainer rank owns one engine); set "
            "rollout.mode: separate for tensor-parallel rollout servers",
            check=lambda r: (
                resolved_rollout_mode(r) != "colocate" or r.rollout.tensor_parallel_size == 1
            ),
            field="rollout.tensorParallelSize",
        ),
        Rule(
            cel=f"{_CEL_ROLLOUT_MODE} != 'colocate' || self.rollout.backend == 'vllm'",
            message="colocate mode needs vllm; set rollout.mode: separate to run "
            "transformers rollout servers",
            check=lambda r: resolved_rollout_mode(r) != "colocate" or r.rollout.backend == "vllm",
            field="rollout.backend",
        ),
    )

    trainer: TrainerResources = Field(default_factory=TrainerResources)
    rollout: RolloutResources = Field(default_factory=RolloutResources)


class Checkpoint(ApiModel):
    """Checkpoint cadence and retention (the final checkpoint of a stage is always kept)."""

    every_steps: int = Field(default=20, ge=1, le=1_000_000)
    keep_last: int = Field(default=3, ge=1, le=1000)


class Stage(ApiModel):
    """One stage of the run (FRE, MGT, ...). Stages run in order."""

    rules = (
        Rule(
            cel="!has(self.critic) || self.algorithm.advantageEstimator == 'gae'",
            message="only algorithm.advantageEstimator gae trains a critic: remove the critic "
            "section or set advantageEstimator: gae",
            check=lambda s: s.critic is None or s.algorithm.advantage_estimator == "gae",
            field="critic",
        ),
        Rule(
            cel="!has(self.evaluation) || self.reward.accuracyWeight > 0.0",
            message="evaluation reports accuracy, which reward.accuracyWeight 0 leaves unscored",
            check=lambda s: s.evaluation is None or s.reward.accuracy_weight > 0,
            field="evaluation",
        ),
    )

    name: StageName
    type: Literal["text", "multimodal"]
    dataset: Dataset
    algorithm: Algorithm = Field(default_factory=Algorithm)
    reward: Reward = Field(default_factory=Reward)
    critic: Critic | None = Field(
        default=None,
        description="PPO's critic (advantageEstimator gae only; filled in with its defaults "
        "when a gae stage leaves it out).",
        json_schema_extra={NO_DEFAULT: True},
    )
    resources: Resources = Field(default_factory=Resources)
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    evaluation: Evaluation | None = Field(
        default=None,
        description="Held-out evaluation; unset: the stage reports its training reward only.",
        json_schema_extra={NO_DEFAULT: True},
    )
    init_from: CheckpointUri | None = Field(
        default=None,
        description="Weights to start from. Default: the model (first stage) or the previous "
        "stage's final checkpoint.",
    )
    stall_timeout_seconds: int | None = Field(
        default=None,
        ge=0,
        le=MAX_STALL_TIMEOUT_S,
        description="This stage's stall timeout, instead of spec.stallTimeoutSeconds (e.g. "
        "longer for a stage with long generations); 0 turns the watchdog off for it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _critic_defaults_for_gae(cls, data: Any) -> Any:
        """A gae stage always has a critic: the defaults when the section is left out."""
        if not isinstance(data, dict) or data.get("critic") is not None:
            return data
        algorithm = data.get("algorithm")
        estimator: Any
        if isinstance(algorithm, Algorithm):
            estimator = algorithm.advantage_estimator
        elif isinstance(algorithm, dict):
            estimator = algorithm.get("advantageEstimator", algorithm.get("advantage_estimator"))
        else:
            return data
        return {**data, "critic": {}} if estimator == "gae" else data


class Images(ApiModel):
    """Container images; unset ones come from the operator's defaults (chart values)."""

    trainer: str | None = Field(default=None, max_length=512)
    rollout: str | None = Field(default=None, max_length=512)
    pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    pull_secrets: list[DnsName] = Field(default_factory=list, max_length=16)


class Toleration(ApiModel):
    key: str | None = Field(default=None, max_length=317)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class PodSecurity(ApiModel):
    """The user and groups every pod of the run runs as. The pods always follow the
    `restricted` Pod Security profile otherwise (RuntimeDefault seccomp, no privilege
    escalation, no capabilities, read-only root filesystem); set these only when your
    trainer image runs as another user than the default image's 1000:1000."""

    run_as_user: int = Field(
        default=1000,
        ge=0,
        le=2_147_483_647,
        description="UID of every container. 0 (root) drops runAsNonRoot and is admitted "
        "only in namespaces whose Pod Security level allows root (baseline or privileged); "
        "a `restricted` namespace rejects the pods, which shows on the run.",
    )
    run_as_group: int = Field(
        default=1000, ge=0, le=2_147_483_647, description="Primary GID of every container."
    )
    fs_group: int = Field(
        default=1000,
        ge=0,
        le=2_147_483_647,
        description="Group that owns the pods' volumes (the rollout token, scratch space).",
    )


class TensorBoardTracking(ApiModel):
    """TensorBoard event files beside the checkpoints."""

    enabled: bool = Field(
        default=False,
        description="Write TensorBoard event files to <storage.uri>/<namespace>/<run>/<uid>/"
        "tensorboard/<stage>/ (uploaded at each checkpoint and at the end; each attempt adds "
        "a file, which TensorBoard merges): `tensorboard --logdir s3://…/<namespace>/<run>/"
        "<uid>/tensorboard` shows every stage.",
    )


class MlflowTracking(ApiModel):
    """An MLflow tracking server: one MLflow run per stage (a restarted stage continues its
    run), params = the stage's hyperparameters, samples tables as JSON artifacts."""

    tracking_uri: str = Field(
        max_length=MAX_URI,
        pattern=r"^https?://[^/ ]+(/[^ ]*)?$",
        description="The tracking server's URL, e.g. http://mlflow.mlflow.svc:5000.",
    )
    experiment: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Experiment name; default: <namespace>/<run>.",
    )
    credentials_secret: DnsName | None = Field(
        default=None,
        description="Secret with MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD (given to the trainer as environment variables).",
    )


class WandbTracking(ApiModel):
    """Weights & Biases: one W&B run per stage, grouped by the LMMR1Run."""

    rules = (
        Rule(
            cel="self.mode == 'offline' || has(self.apiKeySecret)",
            message="online mode needs apiKeySecret (a Secret with key WANDB_API_KEY); "
            "use mode offline to log without an account",
            check=lambda w: w.mode == "offline" or w.api_key_secret is not None,
            field="apiKeySecret",
        ),
    )

    project: str = Field(
        min_length=1, max_length=128, pattern=r"^[^/# ?%:]+$", description="W&B project."
    )
    entity: str | None = Field(
        default=None, max_length=128, pattern=r"^[^/# ?%:]+$", description="W&B team or user."
    )
    mode: Literal["online", "offline"] = Field(
        default="online",
        description="offline: the run is written to <storage.uri>/<namespace>/<run>/<uid>/wandb/"
        "<stage>/ for a later `wandb sync`.",
    )
    api_key_secret: DnsName | None = Field(
        default=None, description="Secret with key WANDB_API_KEY (needed online)."
    )


class Tracking(ApiModel):
    """Experiment tracking from the trainer's rank 0, each back end optional. Every step
    logs reward (and its format and accuracy parts), accuracy, response length, KL,
    entropy, policy loss, learning rate and phase timings. A back end that fails while the
    run trains (its server down) is logged and skipped; it never stops training."""

    tensorboard: TensorBoardTracking | None = None
    mlflow: MlflowTracking | None = None
    wandb: WandbTracking | None = None
    log_samples_every_steps: int = Field(
        default=10,
        ge=0,
        le=100_000,
        description="Log a table of sampled responses (prompt, response, reward) every this "
        "many steps; 0: never.",
    )


_IMMUTABLE = "cannot change once the run exists; create a new run instead"


class LMMR1RunSpec(ApiModel):
    """An LMM-R1 training run: an ordered list of stages on one base model."""

    rules = (
        Rule(
            cel="self.stages.all(s, self.stages.exists_one(t, t.name == s.name))",
            message="stage names must be unique",
            check=lambda s: len({st.name for st in s.stages}) == len(s.stages),
            field="stages",
        ),
        Rule(cel="self.model == oldSelf.model", message=_IMMUTABLE, field="model", transition=True),
        Rule(
            cel="self.storage == oldSelf.storage",
            message=_IMMUTABLE,
            field="storage",
            transition=True,
        ),
        Rule(
            cel="self.stages == oldSelf.stages",
            message=f"{_IMMUTABLE} (suspend it, or start a new run from a checkpoint)",
            field="stages",
            transition=True,
        ),
    )

    model: ModelSource
    storage: Storage
    stages: list[Stage] = Field(min_length=1, max_length=8)
    images: Images = Field(default_factory=Images)
    suspend: bool = Field(
        default=False,
        description="true stops the pods and keeps the run; false resumes "
        "from the last checkpoint.",
    )
    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Stage restarts (from the last checkpoint) before the run fails. "
        "Disruptions (a pod Kubernetes preempted, evicted or lost with its node: its "
        "condition DisruptionTarget) restart the stage too but never count.",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=31_536_000,
        description="Fail the run after this long since it started, less the time it was "
        "suspended.",
    )
    stall_timeout_seconds: int = Field(
        default=DEFAULT_STALL_TIMEOUT_S,
        ge=0,
        le=MAX_STALL_TIMEOUT_S,
        description="A stage whose trainer runs (every trainer pod Running) but reports no "
        "progress for this long fails its attempt with reason Stalled and restarts from its "
        "last committed checkpoint (counted against backoffLimit). The default covers the "
        "model's download, vLLM's start and a first step of a 3B model on 8 GPUs; 0 turns "
        "the watchdog off. A stage's own stallTimeoutSeconds overrides it.",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=31_536_000,
        description="Delete the run (not its checkpoints) this long after it ends.",
    )
    service_account_name: DnsName | None = Field(
        default=None, description="Pods' service account (IRSA / workload identity)."
    )
    queue_name: DnsName | None = Field(
        default=None,
        description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name). Set, each stage "
        "attempt runs as one JobSet that Kueue admits as a gang (needs JobSet v0.11.1+ and "
        "Kueue v0.17.0+); unset, as a trainer Job and rollout pods.",
    )
    priority_class_name: DnsName | None = None
    security_context: PodSecurity = Field(
        default_factory=PodSecurity,
        description="UID/GIDs of the pods (defaults: the trainer image's 1000:1000).",
    )
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=32)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    tracking: Tracking | None = Field(
        default=None,
        description="Experiment tracking (TensorBoard, MLflow, W&B); none by default.",
    )


def stall_timeout(spec: LMMR1RunSpec, index: int) -> int:
    """Seconds without progress before stage `index` is Stalled (0: never)."""
    own = spec.stages[index].stall_timeout_seconds
    return spec.stall_timeout_seconds if own is None else own
