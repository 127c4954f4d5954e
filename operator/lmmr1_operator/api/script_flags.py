"""How the LMM-R1 scripts' flags (TideDra/lmm-r1, examples/scripts/lmm_r1/*.sh: OpenRLHF's
`train_ppo_ray` command line) map onto an LMMR1Run, for `docs/api.md`. Each entry names the
flag, the CR field that carries it (a path of the generated schema, checked by the tests;
empty where no field does) and how the operator treats it."""

from __future__ import annotations

from typing import NamedTuple


class ScriptFlag(NamedTuple):
    flag: str
    field: str  # a path under spec (stages[] for per-stage fields); "" when none
    note: str


STAGE = "spec.stages[]"
SCRIPT_FLAGS: tuple[ScriptFlag, ...] = (
    ScriptFlag(
        "--pretrain",
        "spec.model.uri",
        f"later stages start from the previous stage's final checkpoint, or `{STAGE}.initFrom`",
    ),
    ScriptFlag("--prompt_data", f"{STAGE}.dataset.uri", ""),
    ScriptFlag("--input_key", f"{STAGE}.dataset.promptKey", "the scripts: message"),
    ScriptFlag("--label_key", f"{STAGE}.dataset.labelKey", "the scripts: answer"),
    ScriptFlag("--max_samples", f"{STAGE}.dataset.maxSamples", "the scripts: 100000"),
    ScriptFlag("--advantage_estimator", f"{STAGE}.algorithm.advantageEstimator", ""),
    ScriptFlag("--n_samples_per_prompt", f"{STAGE}.algorithm.samplesPerPrompt", "16"),
    ScriptFlag("--rollout_batch_size", f"{STAGE}.algorithm.rolloutBatchSize", "256 (Sokoban 128)"),
    ScriptFlag("--train_batch_size", f"{STAGE}.algorithm.trainBatchSize", "256 (Sokoban 128)"),
    ScriptFlag(
        "--micro_train_batch_size",
        f"{STAGE}.algorithm.microTrainBatchSize",
        "2; 1 with 8k-token generation (MGT-PerceReason, Sokoban)",
    ),
    ScriptFlag(
        "--micro_rollout_batch_size",
        "",
        "none: the log-prob passes use "
        "microTrainBatchSize, and vLLM batches a step's prompts itself",
    ),
    ScriptFlag("--max_epochs", f"{STAGE}.algorithm.epochsPerRollout", "1"),
    ScriptFlag("--num_episodes", f"{STAGE}.algorithm.episodes", "2 (Sokoban 4)"),
    ScriptFlag("--prompt_max_len", f"{STAGE}.algorithm.maxPromptLength", "4096"),
    ScriptFlag(
        "--generate_max_len",
        f"{STAGE}.algorithm.maxGenerationLength",
        "4096; 8192 for MGT-PerceReason and Sokoban",
    ),
    ScriptFlag("--temperature", f"{STAGE}.algorithm.temperature", "1.0"),
    ScriptFlag(
        "--actor_learning_rate",
        f"{STAGE}.algorithm.learningRate",
        "4e-7 FRE-Text and MGT-PerceReason, 1e-6 the others",
    ),
    ScriptFlag("--init_kl_coef", f"{STAGE}.algorithm.klCoef", "0.001 (Sokoban 0)"),
    ScriptFlag(
        "--use_kl_loss",
        f"{STAGE}.algorithm.klInReward",
        "absent from the scripts: KL in the reward, klInReward true",
    ),
    ScriptFlag("--kl_estimator", f"{STAGE}.algorithm.klEstimator", "OpenRLHF's default k1"),
    ScriptFlag("--zero_stage", f"{STAGE}.algorithm.zeroStage", "3"),
    ScriptFlag("--bf16", f"{STAGE}.algorithm.bf16", ""),
    ScriptFlag("--gradient_checkpointing", f"{STAGE}.algorithm.gradientCheckpointing", ""),
    ScriptFlag("--seed", f"{STAGE}.algorithm.seed", "OpenRLHF's default 42"),
    ScriptFlag(
        "--save_steps",
        f"{STAGE}.checkpoint.everySteps",
        "20 (Sokoban 5); steps are rollout batches in both",
    ),
    ScriptFlag(
        "--ckpt_path, --save_path",
        "spec.storage.uri",
        "checkpoints go to S3 under <uri>/<namespace>/<run>/<uid>/<stage>/step-N",
    ),
    ScriptFlag(
        "--save_hf_ckpt",
        "",
        "always: every checkpoint holds the policy as a Hugging Face model directory",
    ),
    ScriptFlag(
        "--load_checkpoint",
        "",
        "always: a restarted stage resumes from its newest committed checkpoint",
    ),
    ScriptFlag(
        "--remote_rm_url",
        f"{STAGE}.reward.verifier",
        "the rule-based verifier runs as a sidecar of each trainer pod; format 0.5 + accuracy "
        "1.0; reward.profile lmm-r1 (default) scores exactly as the scripts' math_verifier.py; "
        "reward.verifier sokoban as train_sokoban.sh's sokoban_verifier.py",
    ),
    ScriptFlag("--actor_num_nodes", f"{STAGE}.resources.trainer.nodes", "1"),
    ScriptFlag("--actor_num_gpus_per_node", f"{STAGE}.resources.trainer.gpusPerNode", "8"),
    ScriptFlag(
        "--ref_num_nodes, --ref_num_gpus_per_node",
        "",
        "the reference model lives in the trainer's ranks",
    ),
    ScriptFlag(
        "--colocate_all_models",
        f"{STAGE}.resources.rollout.mode",
        "colocate (the default for a one-node trainer)",
    ),
    ScriptFlag(
        "--vllm_num_engines",
        f"{STAGE}.resources.rollout.replicas",
        "colocate: one engine per trainer rank; separate: rollout server pods",
    ),
    ScriptFlag("--vllm_tensor_parallel_size", f"{STAGE}.resources.rollout.tensorParallelSize", "1"),
    ScriptFlag(
        "--vllm_gpu_memory_utilization", f"{STAGE}.resources.rollout.gpuMemoryUtilization", "0.5"
    ),
    ScriptFlag(
        "--vllm_enable_sleep",
        "",
        "always in colocate mode on GPU: the engine sleeps during the update",
    ),
    ScriptFlag(
        "--vllm_sync_backend", "", "colocate: weights load in process; separate: NCCL on GPU"
    ),
    ScriptFlag("--enable_prefix_caching", "", "vLLM's default on GPU"),
    ScriptFlag("--flash_attn", "", "the attention kernels are vLLM's and transformers' defaults"),
    ScriptFlag(
        "--critic_learning_rate",
        f"{STAGE}.critic.learningRate",
        "9e-6 (Sokoban 5e-6); PPO with a critic: advantageEstimator gae (MGT-Geo, Direct-RL, "
        "Sokoban), whose stages get a critic section with its defaults",
    ),
    ScriptFlag("--gamma", f"{STAGE}.critic.gamma", "1.0"),
    ScriptFlag("--lambd", f"{STAGE}.critic.gaeLambda", "1.0"),
    ScriptFlag("--value_clip", f"{STAGE}.critic.valueClip", "OpenRLHF's default 0.2"),
    ScriptFlag(
        "--critic_num_nodes, --critic_num_gpus_per_node",
        "",
        "the critic lives in the trainer's ranks (its own DeepSpeed engine)",
    ),
    ScriptFlag(
        "--normalize_reward",
        "",
        "not applied: rewards are the verifier's, with the "
        "group baseline and batch whitening of the estimator",
    ),
    ScriptFlag(
        "--freeze_prefix",
        f"{STAGE}.algorithm.freezePrefix",
        "Sokoban: visual (the vision tower, by the checkpoint's names); none elsewhere",
    ),
    ScriptFlag(
        "--use_wandb, --use_tensorboard, --wandb_group, --wandb_run_name",
        "",
        "progress goes to status, Events and the operator's metrics",
    ),
)


def render_script_flags() -> list[str]:
    """The mapping as a Markdown section."""
    out = [
        "",
        "## The LMM-R1 scripts' flags",
        "",
        "The published scripts (TideDra/lmm-r1, `examples/scripts/lmm_r1/*.sh`) and the field",
        "that carries each flag; a field's default is the scripts' value unless its row says",
        "otherwise. A step is one rollout batch everywhere (status, maxSteps, everySteps).",
        "",
        "| flag | field | the scripts, and notes |",
        "|---|---|---|",
    ]
    for flag in SCRIPT_FLAGS:
        field = f"`{flag.field}`" if flag.field else "none"
        out.append(f"| `{flag.flag}` | {field} | {flag.note.replace('|', chr(92) + '|')} |")
    return out


# The six published scripts, in the paper's order, and the example manifest of each
# (manifests/examples/recipes/<script>.yaml).
SCRIPTS: tuple[str, ...] = (
    "train_fre_text",
    "train_fre_multi",
    "train_mgt_geo",
    "train_mgt_percereas",
    "train_direct_rl_geo",
    "train_sokoban",
)
Value = str | int | float | bool | list[str] | None


class ScriptValues(NamedTuple):
    """What each script sets a flag to, as the CR field holds it (one per SCRIPTS entry;
    None: the manifest leaves the field unset, because the script does not set the flag or
    the flag has no effect there, as --gamma and --lambd without a critic)."""

    flag: str
    field: str
    values: tuple[Value, ...]


def _same(value: Value) -> tuple[Value, ...]:
    return (value,) * len(SCRIPTS)


SCRIPT_VALUES: tuple[ScriptValues, ...] = (
    ScriptValues(
        "--advantage_estimator",
        f"{STAGE}.algorithm.advantageEstimator",
        ("reinforce_baseline", "reinforce_baseline", "gae", "reinforce_baseline", "gae", "gae"),
    ),
    ScriptValues(
        "--actor_learning_rate",
        f"{STAGE}.algorithm.learningRate",
        (4e-7, 1e-6, 1e-6, 4e-7, 1e-6, 1e-6),
    ),
    ScriptValues(
        "--init_kl_coef", f"{STAGE}.algorithm.klCoef", (1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 0.0)
    ),
    ScriptValues("--n_samples_per_prompt", f"{STAGE}.algorithm.samplesPerPrompt", _same(16)),
    ScriptValues(
        "--rollout_batch_size", f"{STAGE}.algorithm.rolloutBatchSize", (256,) * 5 + (128,)
    ),
    ScriptValues("--train_batch_size", f"{STAGE}.algorithm.trainBatchSize", (256,) * 5 + (128,)),
    ScriptValues(
        "--micro_train_batch_size", f"{STAGE}.algorithm.microTrainBatchSize", (2, 2, 2, 1, 2, 1)
    ),
    ScriptValues("--max_epochs", f"{STAGE}.algorithm.epochsPerRollout", _same(1)),
    ScriptValues("--num_episodes", f"{STAGE}.algorithm.episodes", (2,) * 5 + (4,)),
    ScriptValues("--prompt_max_len", f"{STAGE}.algorithm.maxPromptLength", _same(4096)),
    ScriptValues(
        "--generate_max_len",
        f"{STAGE}.algorithm.maxGenerationLength",
        (4096, 4096, 4096, 8192, 4096, 8196),
    ),
    ScriptValues("--temperature", f"{STAGE}.algorithm.temperature", _same(1.0)),
    ScriptValues("--zero_stage", f"{STAGE}.algorithm.zeroStage", _same(3)),
    ScriptValues("--bf16", f"{STAGE}.algorithm.bf16", _same(True)),
    ScriptValues(
        "--gradient_checkpointing", f"{STAGE}.algorithm.gradientCheckpointing", _same(True)
    ),
    ScriptValues("--input_key", f"{STAGE}.dataset.promptKey", _same("message")),
    ScriptValues("--label_key", f"{STAGE}.dataset.labelKey", ("answer",) * 5 + (None,)),
    ScriptValues("--max_samples", f"{STAGE}.dataset.maxSamples", _same(100000)),
    ScriptValues("--save_steps", f"{STAGE}.checkpoint.everySteps", (20,) * 5 + (5,)),
    ScriptValues("--actor_num_nodes", f"{STAGE}.resources.trainer.nodes", _same(1)),
    ScriptValues("--actor_num_gpus_per_node", f"{STAGE}.resources.trainer.gpusPerNode", _same(8)),
    ScriptValues("--colocate_all_models", f"{STAGE}.resources.rollout.mode", _same("colocate")),
    ScriptValues(
        "--vllm_tensor_parallel_size", f"{STAGE}.resources.rollout.tensorParallelSize", _same(1)
    ),
    ScriptValues(
        "--vllm_gpu_memory_utilization",
        f"{STAGE}.resources.rollout.gpuMemoryUtilization",
        _same(0.5),
    ),
    ScriptValues("--prompt-template (verifier)", f"{STAGE}.reward.promptTemplate", _same("chatml")),
    ScriptValues(
        "math_verifier.py (the reward server)",
        f"{STAGE}.reward.profile",
        ("lmm-r1",) * 5 + (None,),
    ),
    ScriptValues(
        "--critic_learning_rate",
        f"{STAGE}.critic.learningRate",
        (None, None, 9e-6, None, 9e-6, 5e-6),
    ),
    ScriptValues("--gamma", f"{STAGE}.critic.gamma", (None, None, 1.0, None, 1.0, 1.0)),
    ScriptValues("--lambd", f"{STAGE}.critic.gaeLambda", (None, None, 1.0, None, 1.0, 1.0)),
    ScriptValues("--freeze_prefix", f"{STAGE}.algorithm.freezePrefix", (None,) * 5 + (["visual"],)),
)


def _cell(value: Value) -> str:
    if isinstance(value, list):
        return f"`{', '.join(value)}`"
    return (
        "unset"
        if value is None
        else f"`{str(value).lower() if isinstance(value, bool) else value}`"
    )


def render_script_values() -> list[str]:
    """Each script's values as a Markdown table (one column per script)."""
    out = [
        "",
        "## Each script's values",
        "",
        "What each published script sets, as the CR field holds it; the example manifests",
        "`manifests/examples/recipes/<script>.yaml` carry exactly these (a test checks them).",
        "",
        "| flag | field | " + " | ".join(f"`{s}`" for s in SCRIPTS) + " |",
        "|---|---|" + "---|" * len(SCRIPTS),
    ]
    for row in SCRIPT_VALUES:
        cells = " | ".join(_cell(v) for v in row.values)
        out.append(f"| `{row.flag}` | `{row.field}` | {cells} |")
    return out
