"""kopf handlers: thin. Each one finds the run it concerns and asks the controller to
reconcile it; all decisions live in `reconcile.decide` (pure)."""

from __future__ import annotations

import logging
import os
import random
from typing import Any, cast

import kopf
from kubernetes import client
from kubernetes import config as kube_config

from lmmr1_operator import naming
from lmmr1_operator.api import GROUP, PLURAL, VERSION
from lmmr1_operator.controller import Controller
from lmmr1_operator.kube import Kube
from lmmr1_operator.metrics import Metrics
from lmmr1_operator.settings import OperatorSettings

log = logging.getLogger("lmmr1.handlers")
SETTINGS = OperatorSettings.from_env()
_controller: Controller | None = None


def _post_event(run: dict[str, Any], kind: str, reason: str, message: str) -> None:
    kopf.event(cast(kopf.Body, run), type=kind, reason=reason, message=message)


def controller() -> Controller:
    if _controller is None:
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return _controller


def ensure_peering(name: str, namespace: str | None) -> None:
    """Create kopf's (Cluster)KopfPeering object unless it exists."""
    api = client.CustomObjectsApi()
    body = {"apiVersion": "kopf.dev/v1", "metadata": {"name": name}}
    try:
        if namespace:
            api.create_namespaced_custom_object(
                "kopf.dev", "v1", namespace, "kopfpeerings", {**body, "kind": "KopfPeering"}
            )
        else:
            api.create_cluster_custom_object(
                "kopf.dev", "v1", "clusterkopfpeerings", {**body, "kind": "ClusterKopfPeering"}
            )
    except client.ApiException as err:
        if err.status != 409:
            raise


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    global _controller
    # Status is typed by the CRD; kopf keeps its own bookkeeping in annotations instead.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="lmmr1.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="lmmr1.io", key="last-handled-configuration"
    )
    try:
        kube_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kube_config.ConfigException:  # run locally: `make operator` with a kubeconfig
        kube_config.load_kube_config()  # type: ignore[no-untyped-call]
    if not settings.peering.standalone:
        # Replicas announce themselves in the peering object; the highest priority acts,
        # the others stand by. kopf needs the object to exist: make it if it does not.
        settings.peering.name = SETTINGS.peering
        settings.peering.clusterwide = SETTINGS.cluster_wide
        settings.peering.mandatory = True
        settings.peering.priority = random.randint(1, 1_000_000)
        ensure_peering(
            SETTINGS.peering,
            None if SETTINGS.cluster_wide else os.environ.get("LMMR1_WATCH_NAMESPACE"),
        )
    # Transitions are posted as Events explicitly (reason + message); kopf's own per-handler
    # "succeeded" lines would repeat every resync, so only its warnings are kept.
    settings.posting.level = logging.WARNING
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    metrics = Metrics()
    metrics.serve(SETTINGS.bind_address, SETTINGS.metrics_port)
    _controller = Controller(Kube(client.ApiClient()), SETTINGS, metrics, _post_event)
    log.info(
        "lmmr1 operator started: peering %s (priority %d), resync every %.1fs",
        settings.peering.name,
        settings.peering.priority,
        SETTINGS.resync_seconds,
    )


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_run_change(namespace: str | None, name: str, **_: Any) -> None:
    controller().reconcile(namespace or "", name)


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.resync_seconds)
def resync(namespace: str | None, name: str, **_: Any) -> None:
    controller().reconcile(namespace or "", name)


@kopf.on.event("", "v1", "configmaps", labels={naming.LABEL_ROLE: "progress"})
@kopf.on.event("batch", "v1", "jobs", labels={naming.LABEL_MANAGED: naming.MANAGER})
@kopf.on.event("", "v1", "pods", labels={naming.LABEL_MANAGED: naming.MANAGER})
def on_child_event(namespace: str | None, meta: kopf.Meta, **_: Any) -> None:
    """Progress reports and pod/Job changes reach the run's status without waiting for
    the next resync."""
    run = meta.labels.get(naming.LABEL_RUN)
    if run and namespace and _controller is not None:
        _controller.reconcile(namespace, run)
