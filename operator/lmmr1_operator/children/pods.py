"""Pieces every stage pod shares: scheduling knobs, S3 env, config and token volumes."""

from __future__ import annotations

from typing import Any

from lmmr1_operator import naming
from lmmr1_operator.children.context import StageContext

CONFIG_DIR = "/etc/lmmr1"
TOKEN_DIR = "/etc/lmmr1/token"

POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def s3_env(ctx: StageContext) -> list[dict[str, Any]]:
    """S3 location as plain env, credentials only by reference to the run's Secret."""
    env: list[dict[str, Any]] = []
    if ctx.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": ctx.s3_endpoint})
    if ctx.s3_region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": ctx.s3_region})
    if ctx.s3_secret:
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": ctx.s3_secret, "key": key}}}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        ]
    return env


def config_volumes(ctx: StageContext) -> list[dict[str, Any]]:
    return [
        {
            "name": "stage-config",
            "configMap": {"name": naming.stage_config(ctx.name, ctx.stage.name)},
        },
        {
            "name": "rollout-token",
            "secret": {"secretName": naming.token_secret(ctx.name), "defaultMode": 0o400},
        },
    ]


def config_mounts() -> list[dict[str, Any]]:
    return [
        {"name": "stage-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "rollout-token", "mountPath": TOKEN_DIR, "readOnly": True},
    ]


def scheduling(ctx: StageContext) -> dict[str, Any]:
    """Pod-spec fields from the run's scheduling knobs."""
    spec = ctx.spec
    out: dict[str, Any] = {}
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        out["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations
        ]
    if spec.priority_class_name:
        out["priorityClassName"] = spec.priority_class_name
    if spec.service_account_name:
        out["serviceAccountName"] = spec.service_account_name
    if spec.images.pull_secrets:
        out["imagePullSecrets"] = [{"name": name} for name in spec.images.pull_secrets]
    return out


def queue_labels(ctx: StageContext) -> dict[str, str]:
    return {naming.KUEUE_QUEUE: ctx.spec.queue_name} if ctx.spec.queue_name else {}


def resources(gpus: int, cpu: str | None, memory: str | None) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
        requests["nvidia.com/gpu"] = str(gpus)
    if cpu:
        requests["cpu"] = cpu
    if memory:
        requests["memory"] = memory
        limits["memory"] = memory
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def pull_policy(ctx: StageContext) -> dict[str, str]:
    return {"imagePullPolicy": ctx.spec.images.pull_policy} if ctx.spec.images.pull_policy else {}
