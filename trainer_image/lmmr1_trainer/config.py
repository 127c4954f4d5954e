"""The stage config: the contract between the operator (which renders it) and the pods
(which run it). Pure pydantic: the operator imports this module, so nothing heavy here.

The operator writes it as `stage.yaml` in the ConfigMap `<run>-<stage>-config`, mounted at
`/etc/lmmr1/stage.yaml` in trainer and rollout pods. Every pod of a stage reads the same file;
secrets never appear in it (S3 keys come as env from the run's Secret, the rollout token as
a mounted file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmmr1_trainer.verifier.config import PromptTemplate, RewardProfile, UnparseableLabelPolicy

CONFIG_PATH = Path("/etc/lmmr1/stage.yaml")
TOKEN_PATH = Path("/etc/lmmr1/token/token")
TERMINATION_LOG = Path("/dev/termination-log")
DEFAULT_WEIGHT_SYNC_TIMEOUT_S = 600.0
# A collective waits this long for its slowest rank, and some phases keep every rank but
# one (or one per node) waiting: rank 0's rollout and scoring of a step and its dataset
# load; a node's local rank 0 uploading a checkpoint (a 3B policy's weights and its fp32
# optimizer state, ~50 GB from one node) or downloading one to resume. At a slow 100 MB/s
# that upload alone takes ~9 minutes, past DeepSpeed's default of 10 with rollout on top.
# An hour covers them with room; a rank that is truly gone still fails the attempt.
DEFAULT_COLLECTIVE_TIMEOUT_S = 3600.0
# How long a rollout server may take to answer /health once its container starts (vLLM
# loading a model, compiling CUDA graphs): the operator's startupProbe on rollout pods.
ROLLOUT_STARTUP_TIMEOUT_S = 1800
# How long the trainer waits for its rollout servers: on the JobSet path (spec.queueName)
# it starts beside them, so their scheduling and image pull come on top of their startup.
# The operator's stall watchdog does not run meanwhile (reconcile._Decision.stalled).
ROLLOUT_READY_TIMEOUT_S = 2 * ROLLOUT_STARTUP_TIMEOUT_S
PROGRESS_KEY = "progress.json"
# Where a pod mounts the PersistentVolumeClaims its `pvc://claim/path` URIs name (read-only,
# at <root>/<claim>); the operator mounts them there, the trainer reads them there.
PVC_ROOT_ENV = "LMMR1_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"

# Exit codes the operator acts on (besides 0). Anything else is retried from the last
# checkpoint, up to the run's backoffLimit.
EXIT_CONFIG_ERROR = 78  # sysexits EX_CONFIG: retrying cannot help; the run fails at once.


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunRef(_Config):
    namespace: str
    name: str
    uid: str = ""
    stage: str
    stage_index: int = Field(ge=0)


class S3Settings(_Config):
    """Where S3 is; credentials come from the environment (AWS_ACCESS_KEY_ID/...) or the
    pod's identity (IRSA / workload identity)."""

    endpoint: str | None = None
    region: str | None = None


class DatasetConfig(_Config):
    uri: str
    type: Literal["text", "multimodal"]
    prompt_key: str = "message"
    label_key: str = "answer"
    image_root: str | None = None
    max_samples: int | None = None
    # A row that cannot be trained on (unparseable, a missing image, too long a prompt):
    # `fail` stops the stage before its first step, naming the rows; `skip` trains without
    # them and reports how many were left out.
    on_bad_row: Literal["fail", "skip"] = "fail"


class EvaluationDatasetConfig(DatasetConfig):
    """A held-out set: a named dataset in the training data's row format."""

    name: str


class EvaluationConfig(_Config):
    """Held-out evaluation (`lmmr1_trainer.evaluation`): sampled by the stage's engines with
    these settings (generation length: the algorithm's), scored by its verifier."""

    datasets: list[EvaluationDatasetConfig] = Field(min_length=1)
    every_steps: int = Field(ge=1)
    before_training: bool = True
    samples_per_prompt: int = Field(default=1, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)


class AlgorithmConfig(_Config):
    """RL hyperparameters; names and defaults match the CRD's `algorithm` (snake_case)."""

    advantage_estimator: Literal["reinforce_baseline", "grpo", "rloo", "gae"] = "reinforce_baseline"
    samples_per_prompt: int = 16
    rollout_batch_size: int = 256
    train_batch_size: int = 256
    micro_train_batch_size: int = 2
    epochs_per_rollout: int = 1
    episodes: int = 2
    max_steps: int | None = None
    learning_rate: float = 4e-7
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1
    kl_coef: float = 0.001
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_in_reward: bool = True
    clip_range: float = 0.2
    grad_clip: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_length: int = 4096
    max_generation_length: int = 4096
    zero_stage: Literal[0, 1, 2, 3] = 3
    bf16: bool = True
    gradient_checkpointing: bool = True
    # Parameter-name prefixes kept out of the optimizer (`lmmr1_trainer.models.freeze`).
    freeze_prefix: list[str] = Field(default_factory=list)
    seed: int = 42


class CriticConfig(_Config):
    """PPO's critic (only with `advantage_estimator: gae`): a value head on a copy of the
    policy's starting weights, trained in its own DeepSpeed engine. Names and defaults match
    the CRD's `critic` and OpenRLHF's flags (the LMM-R1 scripts: 9e-6, Sokoban 5e-6)."""

    learning_rate: float = Field(default=9e-6, gt=0)  # --critic_learning_rate
    warmup_ratio: float | None = Field(default=None, ge=0, le=1)  # None: the policy's
    value_clip: float | None = Field(default=0.2, gt=0)  # --value_clip; None: no clipping
    gamma: float = Field(default=1.0, ge=0, le=1)  # --gamma
    gae_lambda: float = Field(default=1.0, ge=0, le=1)  # --lambd


class RewardConfig(_Config):
    """How the trainer reaches its verifier sidecar, and how the sidecar scores."""

    url: str = Field(
        description="e.g. http://${POD_IP}:5000: the sidecar binds the pod IP, which only the "
        "pod knows, so environment variables in it are expanded (see `resolved_url`)"
    )
    verifier: str = "math"
    format_weight: float = 0.5
    accuracy_weight: float = 1.0
    prompt_template: PromptTemplate = PromptTemplate.CHATML
    profile: RewardProfile = RewardProfile.LMM_R1
    # None: the profile's rule (lmm-r1: one).
    unparseable_label: UnparseableLabelPolicy | None = None

    def resolved_url(self) -> str:
        return os.path.expandvars(self.url)


class RolloutConfig(_Config):
    """Where the stage's samples are generated.

    `colocate` (the paper's layout, the default): every trainer rank owns a vLLM engine in
    its own process and generates its share of each step's prompts; new weights go straight
    into the engine after each update (on GPU the engine sleeps while the policy trains).
    No rollout pods. `separate`: rollout servers in their own pods (`urls`, started by the
    operator first), weights pushed to them after each update (NCCL on GPU, HTTP on CPU).
    `backend: transformers` is an explicit fallback for `separate` only (no vLLM).
    """

    mode: Literal["colocate", "separate"] = "colocate"
    urls: list[str] = Field(default_factory=list)
    backend: Literal["vllm", "transformers"] = "vllm"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    # vLLM's CPU back end reserves this much memory for its KV cache (VLLM_CPU_KVCACHE_SPACE);
    # ignored on GPU, where gpu_memory_utilization sizes it.
    cpu_kv_cache_gib: int = Field(default=1, ge=1)
    # A weight update that takes longer fails the attempt (the stage restarts from its last
    # checkpoint) instead of hanging the trainer.
    weight_sync_timeout_s: float = Field(default=DEFAULT_WEIGHT_SYNC_TIMEOUT_S, gt=0)
    token_file: str = str(TOKEN_PATH)

    @model_validator(mode="after")
    def _consistent(self) -> RolloutConfig:
        if self.mode == "colocate" and self.urls:
            raise ValueError("rollout.urls must be empty in colocate mode (no rollout servers)")
        if self.mode == "colocate" and self.backend != "vllm":
            raise ValueError("rollout.mode colocate needs rollout.backend vllm")
        return self


class TrainerTopology(_Config):
    nodes: int = 1
    gpus_per_node: int = 8  # 0: CPU (DeepSpeed with DS_ACCELERATOR=cpu, gloo)
    # Every collective between the trainer's ranks fails after this many seconds (the
    # process group's timeout) instead of hanging when a rank is gone.
    collective_timeout_s: float = Field(default=DEFAULT_COLLECTIVE_TIMEOUT_S, gt=0)
    # The scratch volume's size limit (the pod's emptyDir sizeLimit); None: the file
    # system's free space is the limit (local runs).
    scratch_bytes: int | None = Field(default=None, ge=0)


class CheckpointConfig(_Config):
    """Checkpoints go to `<uri>/step-<N>/`; `uri` already names namespace, run and stage."""

    uri: str
    every_steps: int = 20
    keep_last: int = 3


class ProgressConfig(_Config):
    """Rank 0 writes `progress.json` into this ConfigMap; the operator mirrors it into the
    run's status (see docs/design.md, "Progress")."""

    configmap: str
    namespace: str


class TensorBoardConfig(_Config):
    """TensorBoard event files, written locally by rank 0 and uploaded under `uri` (the
    operator: `<storage>/<namespace>/<run>/tensorboard/<stage>`) at every checkpoint and at
    the end. Each attempt writes a new event file beside the earlier ones; TensorBoard
    merges the files of a folder."""

    uri: str


class MlflowConfig(_Config):
    """An MLflow tracking server. Credentials are not here: the client reads
    MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD from the environment."""

    tracking_uri: str = Field(pattern=r"^(https?|file)://[^ ]+$")
    experiment: str = Field(min_length=1, max_length=256)


class WandbConfig(_Config):
    """Weights & Biases. The API key is not here: the client reads WANDB_API_KEY. Offline
    runs are uploaded under `uri` (when set) for `wandb sync`."""

    project: str = Field(min_length=1, max_length=128)
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"
    uri: str | None = None


class TrackingConfig(_Config):
    """Experiment tracking from rank 0 (`lmmr1_trainer.tracking`); every back end optional."""

    tensorboard: TensorBoardConfig | None = None
    mlflow: MlflowConfig | None = None
    wandb: WandbConfig | None = None
    # A table of sampled responses (prompt, response, reward) every this many steps; 0: never.
    log_samples_every_steps: int = Field(default=10, ge=0)
    samples_per_table: int = Field(default=8, ge=1)

    @property
    def enabled(self) -> bool:
        return any(b is not None for b in (self.tensorboard, self.mlflow, self.wandb))


class StageConfig(_Config):
    run: RunRef
    init_from: str = Field(description="Weights to start from: hf://, s3:// or pvc:// URI")
    dataset: DatasetConfig
    algorithm: AlgorithmConfig = AlgorithmConfig()
    reward: RewardConfig
    # Filled in with its defaults for gae; refused otherwise (nothing would use it).
    critic: CriticConfig | None = None
    rollout: RolloutConfig = RolloutConfig()
    trainer: TrainerTopology = TrainerTopology()
    checkpoint: CheckpointConfig
    progress: ProgressConfig
    s3: S3Settings = S3Settings()
    evaluation: EvaluationConfig | None = None
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="before")
    @classmethod
    def _critic_for_gae(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        algorithm = data.get("algorithm") or {}
        estimator = (
            algorithm.advantage_estimator
            if isinstance(algorithm, AlgorithmConfig)
            else algorithm.get("advantage_estimator", "reinforce_baseline")
        )
        if estimator == "gae" and data.get("critic") is None:
            return {**data, "critic": {}}
        if estimator != "gae" and data.get("critic") is not None:
            raise ValueError(
                f"critic: only advantage_estimator gae trains a critic (this stage uses "
                f"{estimator}); remove the critic section or use gae"
            )
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def load(cls, path: Path = CONFIG_PATH) -> StageConfig:
        return cls.model_validate(yaml.safe_load(path.read_text()))


class EvaluationResult(_Config):
    """One held-out set measured at one step (step 0: the stage's starting weights)."""

    step: int = Field(ge=0)
    accuracy: float  # mean accuracy over every sample
    pass_at_k: float | None = None  # unbiased pass@k, k = samples per prompt; None for k = 1
    k: int = Field(default=1, ge=1)
    format_rate: float | None = None  # share of samples in the rewarded format
    response_length: float  # mean generated tokens per sample
    prompts: int = Field(ge=0)


class DatasetEvaluation(_Config):
    """A held-out set's results in one stage: where it started, the newest, the last."""

    baseline: EvaluationResult | None = None
    latest: EvaluationResult | None = None
    final: EvaluationResult | None = None


class Progress(_Config):
    """What rank 0 reports (the value of `progress.json`)."""

    stage: str
    step: int = Field(ge=0)
    total_steps: int = Field(ge=0)
    reward: float | None = None
    accuracy: float | None = None
    initial_reward: float | None = None
    tokens_per_second: float | None = None
    # What generates the samples, e.g. "vllm 0.32.0 cpu, colocate".
    rollout_engine: str | None = Field(default=None, max_length=128)
    last_checkpoint: str | None = None
    final_checkpoint: str | None = None  # set once, when the stage's last checkpoint commits
    # Dataset rows left out by the pre-flight check (`dataset.on_bad_row: skip`).
    skipped_rows: int | None = Field(default=None, ge=0)
    # Held-out results by evaluation dataset name (`stage.evaluation`).
    evaluation: dict[str, DatasetEvaluation] | None = None
    updated_at: str
