"""The operator's own settings, from its environment (set by the chart)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

# A namespace name (RFC 1123 label), as the API server requires.
NamespaceName = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
]


class OperatorSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    trainer_image: str = "ghcr.io/lmmr1/lmmr1-trainer:0.1.0"
    rollout_image: str = "ghcr.io/lmmr1/lmmr1-trainer:0.1.0"
    default_s3_endpoint: str | None = None
    default_s3_region: str | None = None
    default_s3_secret: str | None = None
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    bind_address: str = "0.0.0.0"
    # Leader election: only the replica holding this Lease (in the operator's namespace)
    # reconciles.
    lease_name: str = "lmmr1-operator"
    operator_namespace: str = "default"
    identity: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # The namespaces whose runs the operator serves (the chart grants its Role in exactly
    # these). Empty means the operator's own namespace: least privilege by default.
    watch_namespaces: tuple[NamespaceName, ...] = ()
    # Cluster-wide mode, an explicit opt-in: every namespace, under a ClusterRole.
    watch_all_namespaces: bool = False
    # A safety net: every unfinished run is reconciled at least this often. Changes
    # (the run's, its children's) and timed decisions (each plan's `recheck_after`)
    # reconcile a run when they happen; this only bounds the damage of a missed event.
    resync_seconds: float = Field(default=30.0, gt=0)
    # First restart waits this long, doubling each time (capped at 5 minutes).
    restart_backoff_seconds: float = Field(default=10.0, ge=0)
    # Runs reconciled at once (controller-runtime's MaxConcurrentReconciles): each pass
    # reads from the informers' cache, so workers wait only on the API server's writes.
    workers: int = Field(default=8, ge=1, le=64)
    # The client-side rate limit on API calls (client-go's QPS and burst), so that a
    # thousand runs created at once cannot flood the API server. The server protects
    # itself too (API Priority and Fairness); this keeps one operator a polite client.
    # 50 QPS held 200 runs created at once to ~50 calls/s, and the test bed's API server
    # served ~90 (docs/benchmarks.md).
    api_qps: float = Field(default=100.0, gt=0)
    api_burst: int = Field(default=200, ge=1)

    @model_validator(mode="after")
    def _one_scope(self) -> OperatorSettings:
        if self.watch_all_namespaces and self.watch_namespaces:
            raise ValueError(
                "watch_all_namespaces (LMMR1_WATCH_ALL_NAMESPACES) and watch_namespaces "
                "(LMMR1_WATCH_NAMESPACES) exclude each other: set one"
            )
        if len(set(self.watch_namespaces)) != len(self.watch_namespaces):
            raise ValueError(
                f"watch_namespaces lists a namespace twice: {list(self.watch_namespaces)}"
            )
        return self

    @property
    def served_namespaces(self) -> tuple[str, ...] | None:
        """The namespaces to watch and resync, or None for every namespace."""
        if self.watch_all_namespaces:
            return None
        return self.watch_namespaces or (self.operator_namespace,)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if env is None else env

        def opt(name: str) -> str | None:
            return env.get(name) or None

        if opt("LMMR1_WATCH_NAMESPACE"):  # the single namespace of chart versions <= 0.1
            raise ValueError(
                "LMMR1_WATCH_NAMESPACE was replaced by LMMR1_WATCH_NAMESPACES "
                "(comma-separated namespaces; or LMMR1_WATCH_ALL_NAMESPACES=true)"
            )
        listed = [ns.strip() for ns in (opt("LMMR1_WATCH_NAMESPACES") or "").split(",")]

        values = {
            "trainer_image": opt("LMMR1_TRAINER_IMAGE"),
            "rollout_image": opt("LMMR1_ROLLOUT_IMAGE"),
            "default_s3_endpoint": opt("LMMR1_DEFAULT_S3_ENDPOINT"),
            "default_s3_region": opt("LMMR1_DEFAULT_S3_REGION"),
            "default_s3_secret": opt("LMMR1_DEFAULT_S3_SECRET"),
            "metrics_port": opt("LMMR1_METRICS_PORT"),
            "bind_address": opt("POD_IP"),
            "lease_name": opt("LMMR1_LEASE_NAME"),
            "operator_namespace": opt("POD_NAMESPACE"),
            "identity": opt("POD_NAME"),
            "watch_namespaces": [ns for ns in listed if ns] or None,
            "watch_all_namespaces": opt("LMMR1_WATCH_ALL_NAMESPACES"),
            "resync_seconds": opt("LMMR1_RESYNC_SECONDS"),
            "restart_backoff_seconds": opt("LMMR1_RESTART_BACKOFF_SECONDS"),
            "workers": opt("LMMR1_WORKERS"),
            "api_qps": opt("LMMR1_API_QPS"),
            "api_burst": opt("LMMR1_API_BURST"),
        }
        return cls.model_validate({k: v for k, v in values.items() if v is not None})
