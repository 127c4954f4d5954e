"""The stage's config (`lmmr1_trainer.config.StageConfig`) and the ConfigMap carrying it."""

from __future__ import annotations

from typing import Any

from lmmr1_operator import naming
from lmmr1_operator.api.spec import resolved_rollout_mode
from lmmr1_operator.children.context import StageContext
from lmmr1_operator.quantity import quantity_bytes
from lmmr1_trainer.config import (
    AlgorithmConfig,
    CheckpointConfig,
    CriticConfig,
    DatasetConfig,
    EvaluationConfig,
    EvaluationDatasetConfig,
    MlflowConfig,
    ProgressConfig,
    RewardConfig,
    RolloutConfig,
    RunRef,
    S3Settings,
    StageConfig,
    TensorBoardConfig,
    TrackingConfig,
    TrainerTopology,
    WandbConfig,
)

CONFIG_KEY = "stage.yaml"
ROLLOUT_KEY = "rollout.yaml"
# The trainer reaches its verifier sidecar at its own pod IP; the pod fills this in.
VERIFIER_URL = f"http://${{POD_IP}}:{naming.VERIFIER_PORT}"


def evaluation(ctx: StageContext) -> EvaluationConfig | None:
    """The stage's evaluation, resolved: each set's type, the cadence's default."""
    stage = ctx.stage
    spec = stage.evaluation
    if spec is None:
        return None
    return EvaluationConfig(
        datasets=[
            EvaluationDatasetConfig(**{**d.model_dump(), "type": d.type or stage.type})
            for d in spec.datasets
        ],
        every_steps=spec.every_steps or stage.checkpoint.every_steps,
        before_training=spec.before_training,
        samples_per_prompt=spec.samples_per_prompt,
        temperature=spec.temperature,
        top_p=spec.top_p,
    )


def render(ctx: StageContext, rollout_urls: list[str]) -> StageConfig:
    stage = ctx.stage
    reward = stage.reward
    rollout = stage.resources.rollout
    return StageConfig(
        run=RunRef(
            namespace=ctx.namespace,
            name=ctx.name,
            uid=ctx.run["metadata"]["uid"],
            stage=stage.name,
            stage_index=ctx.index,
        ),
        init_from=ctx.init_from,
        dataset=DatasetConfig(type=stage.type, **stage.dataset.model_dump()),
        algorithm=AlgorithmConfig(**stage.algorithm.model_dump()),
        reward=RewardConfig(
            url=VERIFIER_URL,
            verifier=reward.verifier,
            format_weight=reward.format_weight,
            accuracy_weight=reward.accuracy_weight,
            prompt_template=reward.prompt_template,
            profile=reward.profile,
            unparseable_label=reward.unparseable_label,
        ),
        critic=CriticConfig(**stage.critic.model_dump()) if stage.critic else None,
        rollout=RolloutConfig(
            mode=resolved_rollout_mode(stage.resources),
            urls=rollout_urls,
            backend=rollout.backend,
            tensor_parallel_size=rollout.tensor_parallel_size,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
        ),
        trainer=TrainerTopology(
            nodes=stage.resources.trainer.nodes,
            gpus_per_node=stage.resources.trainer.gpus_per_node,
            scratch_bytes=quantity_bytes(stage.resources.trainer.scratch_size),
        ),
        checkpoint=CheckpointConfig(
            uri=ctx.checkpoint_uri,
            every_steps=stage.checkpoint.every_steps,
            keep_last=stage.checkpoint.keep_last,
        ),
        progress=ProgressConfig(
            configmap=naming.progress_configmap(ctx.name), namespace=ctx.namespace
        ),
        s3=S3Settings(endpoint=ctx.s3_endpoint, region=ctx.s3_region),
        evaluation=evaluation(ctx),
        tracking=tracking(ctx),
    )


def tracking(ctx: StageContext) -> TrackingConfig:
    """The run's `tracking` for this stage: where its files go, the experiment's name.
    Credentials stay in their Secrets (the trainer's env, `children.trainer`)."""
    spec = ctx.spec.tracking
    if spec is None:
        return TrackingConfig()
    tensorboard = spec.tensorboard is not None and spec.tensorboard.enabled
    return TrackingConfig(
        tensorboard=TensorBoardConfig(uri=ctx.tracking_uri("tensorboard")) if tensorboard else None,
        mlflow=(
            MlflowConfig(
                tracking_uri=spec.mlflow.tracking_uri,
                experiment=spec.mlflow.experiment or f"{ctx.namespace}/{ctx.name}",
            )
            if spec.mlflow
            else None
        ),
        wandb=(
            WandbConfig(
                project=spec.wandb.project,
                entity=spec.wandb.entity,
                mode=spec.wandb.mode,
                uri=ctx.tracking_uri("wandb") if spec.wandb.mode == "offline" else None,
            )
            if spec.wandb
            else None
        ),
        log_samples_every_steps=spec.log_samples_every_steps,
    )


def configmap(ctx: StageContext, rollout_urls: list[str] | None) -> dict[str, Any]:
    """Separate mode: `rollout.yaml` (what rollout servers need) from the start, `stage.yaml`
    (with the rollout servers' URLs) once they are up and the trainer can start. Colocate
    mode: `stage.yaml` alone, at once (no rollout servers, no URLs)."""
    if resolved_rollout_mode(ctx.stage.resources) == "colocate":
        data = {CONFIG_KEY: render(ctx, []).to_yaml()}
    else:
        data = {ROLLOUT_KEY: render(ctx, []).to_yaml()}
        if rollout_urls is not None:
            data[CONFIG_KEY] = render(ctx, rollout_urls).to_yaml()
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": naming.child_metadata(
            ctx.run,
            naming.stage_config(ctx.name, ctx.stage.name),
            naming.stage_labels(ctx.name, ctx.stage.name, "config"),
        ),
        "data": data,
    }
