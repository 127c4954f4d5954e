"""Rollout servers (separate mode only): one pod per replica (vLLM on GPU or CPU,
transformers when asked for) and a headless Service giving them stable DNS names in real
clusters."""

from __future__ import annotations

from typing import Any

from lmmr1_operator import naming
from lmmr1_operator.children import pods
from lmmr1_operator.children.context import StageContext
from lmmr1_trainer.config import ROLLOUT_STARTUP_TIMEOUT_S

STARTUP_PROBE_PERIOD_S = 2


def pod(ctx: StageContext, replica: int) -> dict[str, Any]:
    rollout = ctx.stage.resources.rollout
    name = naming.rollout_pod(ctx.name, ctx.stage.name, ctx.attempt, replica)
    claims = pods.pvc_claims([ctx.init_from])  # the weights it serves; prompts come inline
    labels = {
        **naming.stage_labels(ctx.name, ctx.stage.name, "rollout"),
        naming.LABEL_ATTEMPT: str(ctx.attempt),
        **pods.queue_labels(ctx),
    }
    container: dict[str, Any] = {
        "name": "rollout",
        "image": ctx.rollout_image,
        **pods.pull_policy(ctx),
        "command": [
            "python",
            "-m",
            "lmmr1_trainer.rollout",
            "--host",
            "$(POD_IP)",
            "--port",
            str(naming.ROLLOUT_PORT),
            "--config",
            f"{pods.CONFIG_DIR}/rollout.yaml",
        ],
        "env": [pods.POD_IP_ENV, *pods.writable_env(), *pods.s3_env(ctx)],
        "ports": [{"name": "http", "containerPort": naming.ROLLOUT_PORT}],
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": naming.ROLLOUT_PORT},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "startupProbe": {
            "httpGet": {"path": "/health", "port": naming.ROLLOUT_PORT},
            "periodSeconds": STARTUP_PROBE_PERIOD_S,
            "failureThreshold": ROLLOUT_STARTUP_TIMEOUT_S // STARTUP_PROBE_PERIOD_S,
        },
        "resources": pods.resources(rollout.gpus_per_replica, rollout.cpu, rollout.memory),
        "volumeMounts": [
            *pods.config_mounts(),
            *pods.writable_mounts(),
            {"name": "dshm", "mountPath": "/dev/shm"},
            *pods.pvc_mounts(claims),
        ],
        "securityContext": pods.container_security_context(),
        # A configuration error (exit 78) writes its reason here; other failures leave the
        # end of the log.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            **naming.child_metadata(ctx.run, name, labels),
            "annotations": {naming.ANNOTATION_REPLICA: str(replica)},
        },
        "spec": {
            # A rollout server that dies restarts the stage (from the last checkpoint), so
            # the pod itself never restarts.
            "restartPolicy": "Never",
            # The rollout server never talks to the API server: no token in the pod.
            "automountServiceAccountToken": False,
            "securityContext": pods.pod_security_context(ctx),
            "hostname": name,
            "subdomain": naming.rollout_service(ctx.name, ctx.stage.name),
            "containers": [container],
            "volumes": [
                *rollout_volumes(ctx),
                *pods.writable_volumes(),
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
                *pods.pvc_volumes(claims),
            ],
            "terminationGracePeriodSeconds": 30,
            **pods.scheduling(ctx),
        },
    }


def rollout_volumes(ctx: StageContext) -> list[dict[str, Any]]:
    """Rollout pods start before the stage config exists (it lists their URLs), so they read
    a rollout-only config (model and sampling) written under its own key."""
    return [
        {
            "name": "stage-config",
            "configMap": {
                "name": naming.stage_config(ctx.name, ctx.stage.name),
                "items": [{"key": "rollout.yaml", "path": "rollout.yaml"}],
            },
        },
        pods.token_volume(ctx),
    ]


def service(ctx: StageContext) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": naming.child_metadata(
            ctx.run,
            naming.rollout_service(ctx.name, ctx.stage.name),
            naming.stage_labels(ctx.name, ctx.stage.name, "rollout"),
        ),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": naming.stage_labels(ctx.name, ctx.stage.name, "rollout"),
            "ports": [{"name": "http", "port": naming.ROLLOUT_PORT}],
        },
    }
