"""The operator's own settings, from its environment (set by the chart)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field


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
    watch_namespace: str | None = None  # None: every namespace
    # Seconds between reconciles of each run (events on children also trigger one).
    resync_seconds: float = Field(default=2.0, gt=0)
    # First restart waits this long, doubling each time (capped at 5 minutes).
    restart_backoff_seconds: float = Field(default=10.0, ge=0)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if env is None else env

        def opt(name: str) -> str | None:
            return env.get(name) or None

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
            "watch_namespace": opt("LMMR1_WATCH_NAMESPACE"),
            "resync_seconds": opt("LMMR1_RESYNC_SECONDS"),
            "restart_backoff_seconds": opt("LMMR1_RESTART_BACKOFF_SECONDS"),
        }
        return cls.model_validate({k: v for k, v in values.items() if v is not None})
