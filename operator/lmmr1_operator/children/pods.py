"""Pieces every stage pod shares: scheduling knobs, S3 env, config and token volumes, the
claims that `pvc://` URIs name (read-only at /mnt/pvc/<claim>), and the `restricted` Pod
Security settings (non-root, RuntimeDefault seccomp, no privilege escalation, no
capabilities, read-only root filesystem with writable emptyDirs for scratch and caches, no
service-account token but where a container talks to the API server)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from lmmr1_operator import naming
from lmmr1_operator.children.context import StageContext
from lmmr1_trainer.config import DEFAULT_PVC_ROOT

CONFIG_DIR = "/etc/lmmr1"
TOKEN_DIR = "/etc/lmmr1/token"
# The root filesystem is read-only: scratch (checkpoint staging, temp files) and caches
# (downloaded models, compiled kernels, HOME) live on per-pod emptyDirs.
SCRATCH_DIR = "/tmp"
CACHE_DIR = "/var/cache/lmmr1"
# Where the kubelet would mount the service-account token; only the trainer gets one.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Readable by the pod's fsGroup (the kubelet chowns Secret volumes to it), by no one else.
TOKEN_MODE = 0o440

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


def token_volume(ctx: StageContext) -> dict[str, Any]:
    return {
        "name": "rollout-token",
        "secret": {"secretName": naming.token_secret(ctx.name), "defaultMode": TOKEN_MODE},
    }


def config_volumes(ctx: StageContext) -> list[dict[str, Any]]:
    return [
        {
            "name": "stage-config",
            "configMap": {"name": naming.stage_config(ctx.name, ctx.stage.name)},
        },
        token_volume(ctx),
    ]


def config_mounts() -> list[dict[str, Any]]:
    return [
        {"name": "stage-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "rollout-token", "mountPath": TOKEN_DIR, "readOnly": True},
    ]


def pvc_claims(uris: Iterable[str | None]) -> list[str]:
    """The distinct PersistentVolumeClaims that `pvc://claim/path` URIs among `uris` name."""
    return sorted({urlsplit(u).netloc for u in uris if u and urlsplit(u).scheme == "pvc"})


def stage_claims(ctx: StageContext) -> list[str]:
    """Claims the stage's trainer reads: its starting weights (the model, an initFrom), its
    dataset and its image root."""
    dataset = ctx.stage.dataset
    return pvc_claims([ctx.init_from, dataset.uri, dataset.image_root])


def pvc_volumes(claims: list[str]) -> list[dict[str, Any]]:
    # Volume names are DNS labels; a claim's name may be longer (a DNS subdomain).
    return [
        {"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        for i, claim in enumerate(claims)
    ]


def pvc_mounts(claims: list[str]) -> list[dict[str, Any]]:
    """Each claim at <DEFAULT_PVC_ROOT>/<claim>, where `lmmr1_trainer.storage.local_path`
    looks for `pvc://claim/path`. Read-only: the pods only read models and data from them."""
    return [
        {"name": f"pvc-{i}", "mountPath": f"{DEFAULT_PVC_ROOT}/{claim}", "readOnly": True}
        for i, claim in enumerate(claims)
    ]


# -- Pod Security (`restricted`) ----------------------------------------------------------


def pod_security_context(ctx: StageContext) -> dict[str, Any]:
    """Pod level: non-root as the run's UID/GIDs (the trainer image's 1000:1000 unless
    `spec.securityContext` says otherwise), fsGroup so mounted Secrets and emptyDirs are
    group-readable to it, the runtime's default seccomp profile."""
    security = ctx.spec.security_context
    return {
        # Root only when the run asks for it (an image that needs it); the namespace's
        # Pod Security level then decides, and a refusal shows on the run.
        "runAsNonRoot": security.run_as_user != 0,
        "runAsUser": security.run_as_user,
        "runAsGroup": security.run_as_group,
        "fsGroup": security.fs_group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }


def writable_volumes(scratch_size: str | None = None) -> list[dict[str, Any]]:
    """Scratch and cache emptyDirs on the node's disk. The trainer's scratch (checkpoint
    staging, tens to hundreds of GB) has a sizeLimit, and the trainer container requests
    as much ephemeral storage, so the scheduler places it on a node with that much disk."""
    scratch: dict[str, Any] = {"sizeLimit": scratch_size} if scratch_size else {}
    return [{"name": "tmp", "emptyDir": scratch}, {"name": "cache", "emptyDir": {}}]


def writable_mounts() -> list[dict[str, Any]]:
    return [
        {"name": "tmp", "mountPath": SCRATCH_DIR},
        {"name": "cache", "mountPath": CACHE_DIR},
    ]


def writable_env() -> list[dict[str, Any]]:
    """Point every cache the pods' code and libraries write at the cache emptyDir: the
    model cache (lmmr1_trainer.models), Hugging Face, Triton and torch extensions (vLLM,
    DeepSpeed), XDG caches, W&B's directories (the tracker puts its runs under the scratch
    directory itself) and HOME (the image's home is on the read-only root)."""
    return [
        {"name": "HOME", "value": CACHE_DIR},
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "LMMR1_MODEL_CACHE", "value": f"{CACHE_DIR}/models"},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
        {"name": "TORCH_EXTENSIONS_DIR", "value": f"{CACHE_DIR}/torch_extensions"},
        {"name": "WANDB_DIR", "value": f"{SCRATCH_DIR}/wandb"},
        {"name": "WANDB_CACHE_DIR", "value": f"{CACHE_DIR}/wandb"},
        {"name": "WANDB_CONFIG_DIR", "value": f"{CACHE_DIR}/wandb/config"},
        {"name": "WANDB_DATA_DIR", "value": f"{CACHE_DIR}/wandb/data"},
        {"name": "WANDB_ARTIFACT_DIR", "value": f"{CACHE_DIR}/wandb/artifacts"},
    ]


def service_account_volume() -> dict[str, Any]:
    """What the kubelet's own `kube-api-access` volume holds (a bound, auto-rotated token,
    the cluster CA, the namespace), as an explicit volume: pods set
    automountServiceAccountToken false and only the container that talks to the API server
    (the trainer, whose rank 0 writes the progress ConfigMap) mounts this."""
    return {
        "name": "kube-api-access",
        "projected": {
            "defaultMode": 0o644,  # as the kubelet sets its own (token: 0600 + fsGroup)
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {
                    "configMap": {
                        "name": "kube-root-ca.crt",
                        "items": [{"key": "ca.crt", "path": "ca.crt"}],
                    }
                },
                {
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "namespace",
                                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                            }
                        ]
                    }
                },
            ],
        },
    }


def service_account_mount() -> dict[str, Any]:
    return {"name": "kube-api-access", "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True}


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


def resources(
    gpus: int, cpu: str | None, memory: str | None, ephemeral_storage: str | None = None
) -> dict[str, Any]:
    requests: dict[str, str] = {}
    if ephemeral_storage:
        requests["ephemeral-storage"] = ephemeral_storage
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
