"""Per-run objects that wire pods to each other and to the operator: the rollout token,
the progress ConfigMap with the Role that lets the pods write it (and nothing else), and the
NetworkPolicy that keeps rollout servers private to their trainer."""

from __future__ import annotations

import base64
import json
from typing import Any

from lmmr1_operator import naming
from lmmr1_operator.children.context import StageContext
from lmmr1_trainer.config import PROGRESS_KEY


def token_secret(run: dict[str, Any], token: str) -> dict[str, Any]:
    name = run["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": naming.child_metadata(
            run, naming.token_secret(name), {**naming.run_labels(name), naming.LABEL_ROLE: "token"}
        ),
        "data": {"token": base64.b64encode(token.encode()).decode()},
    }


def progress_configmap(run: dict[str, Any]) -> dict[str, Any]:
    name = run["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": naming.child_metadata(
            run,
            naming.progress_configmap(name),
            {**naming.run_labels(name), naming.LABEL_ROLE: "progress"},
        ),
        "data": {PROGRESS_KEY: json.dumps({})},
    }


def progress_role(run: dict[str, Any]) -> dict[str, Any]:
    name = run["metadata"]["name"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": naming.child_metadata(run, naming.progress_role(name), naming.run_labels(name)),
        # Only this run's progress ConfigMap, only read and write.
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [naming.progress_configmap(name)],
                "verbs": ["get", "patch", "update"],
            }
        ],
    }


def progress_binding(run: dict[str, Any], service_account: str) -> dict[str, Any]:
    name = run["metadata"]["name"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": naming.child_metadata(run, naming.progress_role(name), naming.run_labels(name)),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": naming.progress_role(name),
        },
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": service_account,
                "namespace": run["metadata"]["namespace"],
            }
        ],
    }


def rollout_network_policy(ctx: StageContext) -> dict[str, Any]:
    """Rollout servers accept connections only from their own stage's trainer pods (the
    weight-update endpoints are guarded by the token as well)."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": naming.child_metadata(
            ctx.run,
            naming.rollout_policy(ctx.name, ctx.stage.name),
            naming.stage_labels(ctx.name, ctx.stage.name, "rollout"),
        ),
        "spec": {
            "podSelector": {
                "matchLabels": naming.stage_labels(ctx.name, ctx.stage.name, "rollout")
            },
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {
                            "podSelector": {
                                "matchLabels": naming.stage_labels(
                                    ctx.name, ctx.stage.name, "trainer"
                                )
                            }
                        }
                    ]
                }
            ],
        },
    }
