"""Per-run objects that wire pods to each other and to the operator: the rollout token,
the progress ConfigMap with the Role that lets the pods write it (and nothing else), and the
per-stage NetworkPolicies that admit exactly the stage's own traffic (NCCL, rendezvous,
rollouts) into its trainer and rollout pods."""

from __future__ import annotations

import base64
import json
from typing import Any

from lmmr1_operator import naming
from lmmr1_operator.api.spec import resolved_rollout_mode
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


def _ingress_policy(ctx: StageContext, name: str, role: str, peers: list[str]) -> dict[str, Any]:
    """A NetworkPolicy isolating the stage's `role` pods for ingress: they accept
    connections, on any port, only from the stage's pods of the `peers` roles. Pod selectors
    without a namespace selector match in the run's namespace alone, and the run and stage
    labels keep other runs and stages out. Egress stays open (S3, DNS, the model hub, the
    API server). The kubelet's probes come from the node, which NetworkPolicy always admits."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": naming.child_metadata(
            ctx.run, name, naming.stage_labels(ctx.name, ctx.stage.name, role)
        ),
        "spec": {
            "podSelector": {"matchLabels": naming.stage_labels(ctx.name, ctx.stage.name, role)},
            "policyTypes": ["Ingress"],
            # No `ports`: NCCL and torch.distributed listen on ports they pick at start.
            "ingress": [
                {
                    "from": [
                        {
                            "podSelector": {
                                "matchLabels": naming.stage_labels(ctx.name, ctx.stage.name, peer)
                            }
                        }
                        for peer in peers
                    ]
                }
            ],
        },
    }


def trainer_network_policy(ctx: StageContext) -> dict[str, Any]:
    """Trainer pods accept the stage's trainer pods (torchrun's rendezvous and NCCL between
    ranks on several nodes) and, in separate mode, its rollout servers: they join rank 0's
    NCCL weight-sync group (its TCP store on $LMMR1_WEIGHT_SYNC_PORT, then NCCL's own
    connections). Nothing else connects to a trainer pod: its verifier is a sidecar that the
    trainer calls on its own pod IP (a pod cannot block access to itself, and it is one of
    the stage's trainer pods anyway), progress goes out to the API server, and the operator
    reads S3 and the API, never the pods. In colocate mode this is the stage's only policy."""
    peers = ["trainer"]
    if resolved_rollout_mode(ctx.stage.resources) == "separate":
        peers.append("rollout")
    return _ingress_policy(ctx, naming.trainer_policy(ctx.name, ctx.stage.name), "trainer", peers)


def rollout_network_policy(ctx: StageContext) -> dict[str, Any]:
    """Rollout servers (separate mode) accept the stage's trainer pods (generation and
    weight updates over HTTP, guarded by the token too; NCCL weight sync) and each other:
    the weight-sync group spans trainer rank 0 and every rollout worker, and NCCL connects
    its members to one another, rollout pod to rollout pod included."""
    return _ingress_policy(
        ctx, naming.rollout_policy(ctx.name, ctx.stage.name), "rollout", ["trainer", "rollout"]
    )
