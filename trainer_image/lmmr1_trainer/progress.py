"""Progress reports from rank 0: `progress.json` in the stage's progress ConfigMap.

`ConfigMapReporter` patches `data["progress.json"]` of `progress.configmap` in
`progress.namespace` through the Kubernetes API: in a pod with the in-cluster service
account (`load_incluster_config`: the token, CA and namespace under
/var/run/secrets/kubernetes.io/serviceaccount, which the operator mounts in the trainer
container alone; the client re-reads the rotated token), elsewhere with $KUBECONFIG (tests,
the demo). When neither
works, `make_reporter` falls back to `FileReporter` ($LMMR1_PROGRESS_FILE) or a no-op. A
failed report is logged and dropped: progress must never stop training.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from lmmr1_trainer.config import PROGRESS_KEY, Progress, ProgressConfig

logger = logging.getLogger(__name__)
PROGRESS_FILE_ENV = "LMMR1_PROGRESS_FILE"


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class ProgressReporter(Protocol):
    def report(self, progress: Progress) -> bool: ...


class NullReporter:
    def report(self, progress: Progress) -> bool:
        logger.info("progress: %s", progress.model_dump_json(exclude_none=True))
        return True


class FileReporter:
    """Writes the JSON to a file (atomically): for local runs and tests without a cluster."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def report(self, progress: Progress) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(progress.model_dump_json())
            tmp.replace(self.path)
            return True
        except OSError as err:
            logger.warning("progress: cannot write %s: %s", self.path, err)
            return False


class ConfigMapReporter:
    def __init__(self, config: ProgressConfig, api: Any) -> None:
        self.config = config
        self.api = api  # kubernetes.client.CoreV1Api

    def report(self, progress: Progress) -> bool:
        body = {"data": {PROGRESS_KEY: progress.model_dump_json()}}
        try:
            self.api.patch_namespaced_config_map(
                self.config.configmap, self.config.namespace, body, _request_timeout=10
            )
            return True
        except Exception as err:  # never let a report stop training
            logger.warning(
                "progress: cannot patch configmap %s/%s: %s",
                self.config.namespace,
                self.config.configmap,
                err,
            )
            return False


def _kubernetes_api() -> Any | None:
    try:
        from kubernetes import client, config
    except ImportError:
        return None
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except Exception:
        kubeconfig = os.environ.get("KUBECONFIG")
        if not kubeconfig:
            return None
        try:
            config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        except Exception as err:
            logger.warning("progress: cannot load %s: %s", kubeconfig, err)
            return None
    return client.CoreV1Api()


def make_reporter(config: ProgressConfig) -> ProgressReporter:
    path = os.environ.get(PROGRESS_FILE_ENV)
    if path:
        return FileReporter(Path(path))
    api = _kubernetes_api()
    if api is not None:
        return ConfigMapReporter(config, api)
    logger.info("progress: not in a cluster and no $%s: reports go to the log", PROGRESS_FILE_ENV)
    return NullReporter()
