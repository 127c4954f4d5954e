"""kopf handlers: thin. Each one finds the run it concerns and asks the controller to
reconcile it; all decisions live in `reconcile.decide` (pure).

Only watch-event handlers are used: kopf never writes to a run (no finalizer, no
bookkeeping annotations), so deleting a run never waits for the operator. Time-driven
work (restart back-off, deadlines, the stall watchdog, TTL, missed events) is a resync loop
over every run: no kopf timer is needed for a timeout to fire without a cluster event.
Both run only on the replica that holds the leader Lease.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, cast

import kopf
import urllib3
from kubernetes import client
from kubernetes import config as kube_config

from lmmr1_operator import naming
from lmmr1_operator.api import GROUP, PLURAL, VERSION
from lmmr1_operator.controller import Controller
from lmmr1_operator.kube import Kube
from lmmr1_operator.leader import LeaderElector
from lmmr1_operator.metrics import Metrics
from lmmr1_operator.scope import check_kopf_scope, describe_scope
from lmmr1_operator.settings import OperatorSettings

log = logging.getLogger("lmmr1.handlers")
SETTINGS = OperatorSettings.from_env()


class _State:
    controller: Controller | None = None
    leader: LeaderElector | None = None
    # One registry and one metrics server per process: kopf retries `configure` after a
    # failure, and a second server on the same port would fail every retry.
    metrics = Metrics()
    stopping = threading.Event()


def _reconcile(namespace: str, name: str, why: str) -> None:
    controller, leader = _State.controller, _State.leader
    if controller is None or leader is None or not leader.is_leader():
        return
    try:
        controller.reconcile(namespace, name)
    except Exception:  # the resync loop retries; a transient API or S3 error heals itself
        log.exception("reconciling %s/%s (%s) failed", namespace, name, why)


def _list_runs(custom: client.CustomObjectsApi) -> list[dict[str, Any]]:
    """Every run the operator serves: one list per watched namespace (its Roles allow no
    cluster-wide list), or one cluster-wide list in cluster-wide mode. A namespace that
    fails to list (deleted, its Role missing) does not stop the others' resync."""
    namespaces = SETTINGS.served_namespaces
    if namespaces is None:
        return list(
            cast(dict[str, Any], custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)).get(
                "items", []
            )
        )
    runs: list[dict[str, Any]] = []
    for namespace in namespaces:
        try:
            page = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        except Exception as err:
            log.warning("listing runs in %s failed: %s", namespace, err)
            continue
        runs += cast(dict[str, Any], page).get("items", [])
    return runs


def _resync_loop(api_client: client.ApiClient) -> None:
    custom = client.CustomObjectsApi(api_client)
    while not _State.stopping.wait(SETTINGS.resync_seconds):
        leader = _State.leader
        if leader is None or not leader.is_leader():
            continue
        try:
            runs = _list_runs(custom)
        except Exception as err:
            log.warning("listing runs failed: %s", err)
            continue
        for run in runs:
            meta = run["metadata"]
            _reconcile(meta["namespace"], meta["name"], "resync")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Transitions are posted as Events explicitly (reason + message); kopf's own per-handler
    # lines would repeat for every watch event, so only its warnings are kept.
    try:
        check_kopf_scope(SETTINGS, sys.argv)
    except ValueError as err:  # permanent: kopf stops instead of retrying
        raise kopf.PermanentError(str(err)) from err
    settings.posting.level = logging.WARNING
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 30
    try:
        kube_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kube_config.ConfigException:  # run locally: `make operator` with a kubeconfig
        kube_config.load_kube_config()  # type: ignore[no-untyped-call]
    api_client = client.ApiClient()
    # Every API call is bounded, so one stuck connection cannot stall reconciling.
    api_client.rest_client.pool_manager.connection_pool_kw["timeout"] = urllib3.Timeout(
        connect=5, read=30
    )
    metrics = _State.metrics
    metrics.serve(SETTINGS.bind_address, SETTINGS.metrics_port)
    kube = Kube(api_client, SETTINGS.identity)
    _State.controller = Controller(kube, SETTINGS, metrics, kube.post_event)
    _State.leader = LeaderElector(
        api_client,
        SETTINGS.operator_namespace,
        SETTINGS.lease_name,
        SETTINGS.identity,
        on_change=metrics.leader.set,
    )
    threading.Thread(target=_State.leader.run, name="leader-election", daemon=True).start()
    threading.Thread(target=_resync_loop, args=(api_client,), name="resync", daemon=True).start()
    log.info(
        "lmmr1 operator %s started: lease %s/%s, %s, resync every %.1fs",
        SETTINGS.identity,
        SETTINGS.operator_namespace,
        SETTINGS.lease_name,
        describe_scope(SETTINGS),
        SETTINGS.resync_seconds,
    )


@kopf.on.cleanup()
def shutdown(**_: Any) -> None:
    _State.stopping.set()
    if _State.leader is not None:
        _State.leader.stopping.set()
        _State.leader.release()


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_run_event(namespace: str | None, name: str, type: str | None, **_: Any) -> None:
    if namespace and type != "DELETED":
        _reconcile(namespace, name, "run changed")


@kopf.on.event("", "v1", "configmaps", labels={naming.LABEL_ROLE: "progress"})
@kopf.on.event("batch", "v1", "jobs", labels={naming.LABEL_MANAGED: naming.MANAGER})
@kopf.on.event("", "v1", "pods", labels={naming.LABEL_MANAGED: naming.MANAGER})
def on_child_event(namespace: str | None, meta: kopf.Meta, **_: Any) -> None:
    """Progress reports and pod/Job changes reach the run's status at once."""
    run = meta.labels.get(naming.LABEL_RUN)
    if run and namespace:
        _reconcile(namespace, run, "child changed")
