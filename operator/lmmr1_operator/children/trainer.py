"""The trainer: an indexed Job (one pod per node) with the verifier as a native sidecar, and
a headless Service for rendezvous between nodes."""

from __future__ import annotations

from typing import Any

from lmmr1_operator import naming, podstate
from lmmr1_operator.children import pods
from lmmr1_operator.children.context import StageContext


def _launch(ctx: StageContext) -> list[str]:
    """One process per GPU through torchrun, wrapped by `lmmr1_trainer.launch` so that a
    rank's configuration error still ends the container with exit 78 and the rank's
    message (torchrun alone turns any worker's failure into exit 1); a single process runs
    plainly and exits 78 itself."""
    topology = ctx.stage.resources.trainer
    train = ["-m", "lmmr1_trainer.train", "--config", f"{pods.CONFIG_DIR}/stage.yaml"]
    per_node = max(topology.gpus_per_node, 1)
    if topology.nodes == 1 and per_node == 1:
        return ["python", *train]
    return [
        "python",
        "-m",
        "lmmr1_trainer.launch",
        f"--nnodes={topology.nodes}",
        f"--nproc-per-node={per_node}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--master-addr=$(MASTER_ADDR)",
        f"--master-port={naming.RENDEZVOUS_PORT}",
        *train,
    ]


def _master_addr(ctx: StageContext) -> str:
    if ctx.stage.resources.trainer.nodes == 1:
        return "$(POD_IP)"
    # Rank 0's pod: hostname `<job>-0`, subdomain the stage's trainer Service.
    job = naming.trainer_job(ctx.name, ctx.stage.name, ctx.attempt)
    service = naming.trainer_service(ctx.name, ctx.stage.name)
    return f"{job}-0.{service}.{ctx.namespace}.svc"


def _env(ctx: StageContext) -> list[dict[str, Any]]:
    topology = ctx.stage.resources.trainer
    env: list[dict[str, Any]] = [
        pods.POD_IP_ENV,
        {"name": "MASTER_ADDR", "value": _master_addr(ctx)},
        {"name": "MASTER_PORT", "value": str(naming.RENDEZVOUS_PORT)},
        {"name": "WORLD_SIZE", "value": str(topology.nodes * max(topology.gpus_per_node, 1))},
        {"name": "NNODES", "value": str(topology.nodes)},
        *pods.writable_env(),
        *pods.s3_env(ctx),
        *_tracking_env(ctx),
    ]
    if topology.gpus_per_node == 0:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    else:
        env += [
            {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
            {"name": "NCCL_DEBUG", "value": "WARN"},
        ]
    return env


# The MLflow client reads a token, or a user name and password: the Secret holds either.
MLFLOW_SECRET_KEYS = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)
WANDB_SECRET_KEY = "WANDB_API_KEY"


def _secret_env(secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": key, "valueFrom": {"secretKeyRef": ref}}


def _tracking_env(ctx: StageContext) -> list[dict[str, Any]]:
    """The tracking servers' credentials, by reference to the user's Secrets (never in the
    stage's ConfigMap). Rank 0 alone logs, but every rank has the same container."""
    tracking = ctx.spec.tracking
    env: list[dict[str, Any]] = []
    if tracking is None:
        return env
    if tracking.mlflow is not None and tracking.mlflow.credentials_secret:
        secret = tracking.mlflow.credentials_secret
        env += [_secret_env(secret, key, optional=True) for key in MLFLOW_SECRET_KEYS]
    if tracking.wandb is not None and tracking.wandb.api_key_secret:
        env.append(_secret_env(tracking.wandb.api_key_secret, WANDB_SECRET_KEY))
    return env


def _verifier_settings(ctx: StageContext) -> list[str]:
    """The reward's flags; an unset `unparseableLabel` leaves the profile's rule."""
    reward = ctx.stage.reward
    flags = ["--profile", str(reward.profile), "--prompt-template", str(reward.prompt_template)]
    if reward.unparseable_label is not None:
        flags += ["--unparseable-label-policy", str(reward.unparseable_label)]
    return [
        *flags,
        "--format-weight",
        str(reward.format_weight),
        "--accuracy-weight",
        str(reward.accuracy_weight),
        "--default-task",
        reward.verifier,
    ]


def _verifier(ctx: StageContext) -> dict[str, Any]:
    return {
        "name": "verifier",
        "image": ctx.trainer_image,
        **pods.pull_policy(ctx),
        # A native sidecar: starts before the trainer, lives as long as it does.
        "restartPolicy": "Always",
        "command": [
            "python",
            "-m",
            "lmmr1_trainer.verifier",
            "--host",
            "$(POD_IP)",
            "--port",
            str(naming.VERIFIER_PORT),
            *_verifier_settings(ctx),
        ],
        "env": [pods.POD_IP_ENV, *pods.writable_env()],
        "ports": [{"name": "verifier", "containerPort": naming.VERIFIER_PORT}],
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": naming.VERIFIER_PORT},
            "periodSeconds": 1,
            "failureThreshold": 120,
        },
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
        "volumeMounts": pods.writable_mounts(),
        "securityContext": pods.container_security_context(),
        # Exit 78 (a setting it rejects) writes the reason here; the operator fails the run.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


# A disrupted pod (preempted, evicted, its node gone) ends the Job at once with a condition
# that names the pod and DisruptionTarget ("Pod ns/name has condition DisruptionTarget
# matching FailJob rule at index 0"), which the operator reads as a disruption (not counted
# against the run's backoffLimit) even after the pod itself is gone. Not `Ignore`: the Job
# controller would then replace the one rank inside the same attempt, and a torchrun rank
# cannot rejoin its peers mid-run (a static rendezvous; the others fail, or hang in a
# collective with a dead peer), nor would the rollout servers restart with it. Every rank
# and rollout server restarts together from the last checkpoint: the operator's restart,
# under a new attempt.
POD_FAILURE_POLICY: dict[str, Any] = {
    "rules": [
        {
            "action": "FailJob",
            "onPodConditions": [{"type": podstate.DISRUPTION_TARGET, "status": "True"}],
        }
    ]
}


def job(ctx: StageContext) -> dict[str, Any]:
    topology = ctx.stage.resources.trainer
    claims = pods.stage_claims(ctx)
    name = naming.trainer_job(ctx.name, ctx.stage.name, ctx.attempt)
    labels = {
        **naming.stage_labels(ctx.name, ctx.stage.name, "trainer"),
        naming.LABEL_ATTEMPT: str(ctx.attempt),
        **pods.queue_labels(ctx),
    }
    trainer = {
        "name": "trainer",
        "image": ctx.trainer_image,
        **pods.pull_policy(ctx),
        "command": _launch(ctx),
        "env": _env(ctx),
        "ports": [{"name": "rendezvous", "containerPort": naming.RENDEZVOUS_PORT}],
        "resources": pods.resources(
            topology.gpus_per_node, topology.cpu, topology.memory, topology.scratch_size
        ),
        "volumeMounts": [
            *pods.config_mounts(),
            *pods.writable_mounts(),
            {"name": "dshm", "mountPath": "/dev/shm"},
            *pods.pvc_mounts(claims),
            # Only the trainer talks to the API server (rank 0 writes the progress report).
            pods.service_account_mount(),
        ],
        "securityContext": pods.container_security_context(),
        # The final checkpoint's URI lands in the pod status on exit, or a configuration
        # error's reason (exit 78); any other failure leaves the end of the log.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": naming.child_metadata(ctx.run, name, labels),
        "spec": {
            "completionMode": "Indexed",
            "completions": topology.nodes,
            "parallelism": topology.nodes,
            # Retries are the operator's: a restart must restart the rollouts too, and
            # resumes from the last checkpoint.
            "backoffLimit": 0,
            "podFailurePolicy": POD_FAILURE_POLICY,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    # The token is mounted explicitly, in the trainer container alone.
                    "automountServiceAccountToken": False,
                    "securityContext": pods.pod_security_context(ctx),
                    "subdomain": naming.trainer_service(ctx.name, ctx.stage.name),
                    "initContainers": [_verifier(ctx)],
                    "containers": [trainer],
                    "volumes": [
                        *pods.config_volumes(ctx),
                        *pods.writable_volumes(topology.scratch_size),
                        pods.service_account_volume(),
                        {
                            "name": "dshm",
                            "emptyDir": {"medium": "Memory", "sizeLimit": topology.shm_size},
                        },
                        *pods.pvc_volumes(claims),
                    ],
                    "terminationGracePeriodSeconds": 60,
                    **pods.scheduling(ctx),
                },
            },
        },
    }


def service(ctx: StageContext) -> dict[str, Any]:
    """One per stage, whatever the attempt: it selects the stage's trainer pods by their
    labels, not by their Job's name (a new one each attempt). Each pod's DNS name is
    `<hostname>.<service>`, and hostnames carry the attempt, so an old attempt's pod still
    terminating never answers for the new attempt's rank."""
    labels = naming.stage_labels(ctx.name, ctx.stage.name, "trainer")
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": naming.child_metadata(
            ctx.run, naming.trainer_service(ctx.name, ctx.stage.name), labels
        ),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": labels,
            "ports": [{"name": "rendezvous", "port": naming.RENDEZVOUS_PORT}],
        },
    }
