"""kopf handlers: thin. Each one finds the run it concerns and asks the controller to
reconcile it; all decisions live in `reconcile.decide` (pure).

Only watch-event handlers are used: kopf never writes to a run (no finalizer, no
bookkeeping annotations), so deleting a run never waits for the operator. Time-driven
work (restart back-off, deadlines, the stall watchdog, TTL) is a resync loop over the
unfinished runs the watch has shown (`RunIndex`; finished ones only when their TTL is due
or their last pass failed): no kopf timer is needed for a timeout to fire without a
cluster event, and no run is listed from the API for it.
Both run only on the replica that holds the leader Lease.
"""

from __future__ import annotations

import datetime as dt
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
from lmmr1_operator.runindex import RunIndex
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
    runs = RunIndex()  # fed by the runs' watch events; what the resync loop visits


def _reconcile(namespace: str, name: str, why: str) -> None:
    controller, leader = _State.controller, _State.leader
    if controller is None or leader is None or not leader.is_leader():
        return
    try:
        controller.reconcile(namespace, name)
    except Exception:  # the resync loop retries; a transient API or S3 error heals itself
        log.exception("reconciling %s/%s (%s) failed", namespace, name, why)
        _State.runs.passed(namespace, name, ok=False)
    else:
        _State.runs.passed(namespace, name, ok=True)


def _resync_loop() -> None:
    """Time-driven work (back-off, deadlines, the stall watchdog, TTL): every unfinished run
    each `resync_seconds`, from the watch's index (`RunIndex`), with no API call to list."""
    while not _State.stopping.wait(SETTINGS.resync_seconds):
        leader = _State.leader
        if leader is None or not leader.is_leader():
            continue
        for namespace, name in _State.runs.due(dt.datetime.now(dt.UTC)):
            _reconcile(namespace, name, "resync")


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
    _State.controller = Controller(
        kube,
        SETTINGS,
        metrics,
        kube.post_event,
        requeue=lambda namespace, name: _reconcile(namespace, name, "checkpoint checked"),
    )
    _State.leader = LeaderElector(
        api_client,
        SETTINGS.operator_namespace,
        SETTINGS.lease_name,
        SETTINGS.identity,
        on_change=metrics.leader.set,
    )
    threading.Thread(target=_State.leader.run, name="leader-election", daemon=True).start()
    threading.Thread(target=_resync_loop, name="resync", daemon=True).start()
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
    if _State.controller is not None:
        _State.controller.verifier.shutdown()
    if _State.leader is not None:
        _State.leader.stopping.set()
        _State.leader.release()


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_run_event(
    namespace: str | None, name: str, type: str | None, body: kopf.Body, **_: Any
) -> None:
    if not namespace:
        return
    if type == "DELETED":
        _State.runs.remove(namespace, name)
        return
    # Every replica keeps the index (kopf lists the runs when it starts watching), so a new
    # leader knows every run at once.
    _State.runs.update(cast(dict[str, Any], dict(body)))
    controller = _State.controller
    if controller is not None and controller.wrote(
        namespace, name, body.metadata.get("resourceVersion")
    ):
        return  # the operator's own status write: nothing the pass that wrote it did not see
    _reconcile(namespace, name, "run changed")


@kopf.on.event("", "v1", "configmaps", labels={naming.LABEL_ROLE: "progress"})
@kopf.on.event("batch", "v1", "jobs", labels={naming.LABEL_MANAGED: naming.MANAGER})
@kopf.on.event("", "v1", "pods", labels={naming.LABEL_MANAGED: naming.MANAGER})
def on_child_event(namespace: str | None, meta: kopf.Meta, **_: Any) -> None:
    """Progress reports and pod/Job changes reach the run's status at once."""
    run = meta.labels.get(naming.LABEL_RUN)
    if run and namespace:
        _reconcile(namespace, run, "child changed")
