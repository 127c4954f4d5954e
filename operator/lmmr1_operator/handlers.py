"""kopf handlers and the operator's event loop: thin. Every change queues the run it
concerns; workers reconcile queued runs; all decisions live in `reconcile.decide` (pure).

- Runs come from kopf's watch of LMMR1Runs. Only a watch-event handler is used: kopf never
  writes to a run (no finalizer, no bookkeeping annotations), so deleting a run never
  waits for the operator. The operator's own status writes trigger nothing.
- Children come from informers (`lmmr1_operator.informer`): server-side label-selected
  list+watch of the operator's own objects, which a reconcile reads instead of the API.
- A de-duplicating work queue (`lmmr1_operator.workqueue`) with `workers` threads: a run
  is reconciled by one worker at a time, once for a burst of events.
- Time-driven work (restart back-off, deadlines, the stall watchdog, TTL) is a resync loop
  over the unfinished runs the watch has shown (`RunIndex`; finished ones only when their
  TTL is due or their last pass failed). No run is listed from the API for it.
Reconciles run only on the replica that holds the leader Lease; every replica keeps its
caches warm, so a new leader starts at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import threading
from typing import Any, ClassVar, cast

import kopf
import urllib3
from kubernetes import client
from kubernetes import config as kube_config

from lmmr1_operator import naming
from lmmr1_operator.api import GROUP, PLURAL, VERSION
from lmmr1_operator.cached_kube import CachedKube
from lmmr1_operator.controller import Controller
from lmmr1_operator.kube import RateLimiter
from lmmr1_operator.leader import LeaderElector
from lmmr1_operator.metrics import Metrics
from lmmr1_operator.runindex import RunIndex
from lmmr1_operator.scope import check_kopf_scope, describe_scope
from lmmr1_operator.settings import OperatorSettings
from lmmr1_operator.workqueue import Key, WorkQueue

log = logging.getLogger("lmmr1.handlers")
SETTINGS = OperatorSettings.from_env()
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 60.0  # a failed pass is retried after 0.5 s, 1 s, 2 s, ...


class _State:
    controller: Controller | None = None
    kube: CachedKube | None = None
    queue: WorkQueue | None = None
    leader: LeaderElector | None = None
    leading = False  # as of the elector's last report
    # One registry and one metrics server per process: kopf retries `configure` after a
    # failure, and a second server on the same port would fail every retry.
    metrics = Metrics()
    stopping = threading.Event()
    runs = RunIndex()  # fed by the runs' watch events; what the resync loop visits
    failures: ClassVar[dict[Key, int]] = {}  # passes in a row that raised, per run (the back-off)


def _enqueue(namespace: str, name: str) -> None:
    if _State.queue is not None:
        _State.queue.add((namespace, name))


def _on_child(obj: dict[str, Any]) -> None:
    """An informer saw a child change: queue its run (a FailedCreate Event's through its
    Job, a Kueue Workload's through its JobSet)."""
    meta = obj["metadata"]
    run = (meta.get("labels") or {}).get(naming.LABEL_RUN)
    if obj.get("kind") == "Event" and _State.kube is not None:
        involved = obj.get("involvedObject") or {}
        job = _State.kube.get("Job", meta["namespace"], involved.get("name") or "")
        run = ((job or {}).get("metadata", {}).get("labels") or {}).get(naming.LABEL_RUN)
    if obj.get("kind") == "Workload" and _State.kube is not None:
        owner = next(
            (r for r in meta.get("ownerReferences") or [] if r.get("kind") == "JobSet"), None
        )
        jobset = _State.kube.get("JobSet", meta["namespace"], owner["name"]) if owner else None
        run = ((jobset or {}).get("metadata", {}).get("labels") or {}).get(naming.LABEL_RUN)
    if run:
        _enqueue(meta["namespace"], run)


def _reconcile(key: Key) -> None:
    """The work queue's handler: one pass over one run, on the leader only."""
    namespace, name = key
    controller, leader, kube = _State.controller, _State.leader, _State.kube
    if controller is None or leader is None or kube is None or not leader.is_leader():
        return
    while not kube.wait_synced(timeout=30):  # decide on complete caches only
        if _State.stopping.is_set():
            return
        log.warning("waiting for the informers' first lists before reconciling")
    try:
        controller.reconcile(namespace, name)
    except Exception:  # retried with back-off: a transient API or S3 error heals itself
        log.exception("reconciling %s/%s failed", namespace, name)
        _State.runs.passed(namespace, name, ok=False)
        failures = _State.failures.get(key, 0)
        _State.failures[key] = failures + 1
        if _State.queue is not None:
            _State.queue.add_after(key, min(RETRY_FIRST_S * 2**failures, RETRY_MAX_S))
    else:
        _State.runs.passed(namespace, name, ok=True)
        _State.failures.pop(key, None)


def _leadership_changed(leading: int) -> None:
    """Told on every renewal: a replica that has just become the leader goes over every
    run it knows at once, not at the next resync."""
    _State.metrics.leader.set(leading)
    became = leading and not _State.leading
    _State.leading = bool(leading)
    if became:
        for namespace, name in _State.runs.due(dt.datetime.now(dt.UTC)):
            _enqueue(namespace, name)


def _resync_loop() -> None:
    """Time-driven work (back-off, deadlines, the stall watchdog, TTL): every unfinished run
    each `resync_seconds`, from the watch's index (`RunIndex`), with no API call to list."""
    while not _State.stopping.wait(SETTINGS.resync_seconds):
        leader = _State.leader
        if leader is None or not leader.is_leader():
            continue
        for namespace, name in _State.runs.due(dt.datetime.now(dt.UTC)):
            _enqueue(namespace, name)


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
    queue = WorkQueue(
        _reconcile,
        SETTINGS.workers,
        on_depth=metrics.queue_depth.set,
        on_wait=metrics.queue_wait.observe,
    )
    kube = CachedKube(
        api_client,
        SETTINGS.identity,
        SETTINGS.served_namespaces,
        _on_child,
        limiter=RateLimiter(SETTINGS.api_qps, SETTINGS.api_burst),
        on_call=lambda verb, kind: metrics.api_requests.labels(verb, kind).inc(),
    )
    _State.kube, _State.queue = kube, queue
    _State.controller = Controller(
        kube,
        SETTINGS,
        metrics,
        kube.post_event,
        requeue=_enqueue,
        retry_later=lambda namespace, name, seconds: queue.add_after((namespace, name), seconds),
    )
    kube.start(_State.stopping)
    queue.start()
    _State.leader = LeaderElector(
        api_client,
        SETTINGS.operator_namespace,
        SETTINGS.lease_name,
        SETTINGS.identity,
        on_change=_leadership_changed,
    )
    threading.Thread(target=_State.leader.run, name="leader-election", daemon=True).start()
    threading.Thread(target=_resync_loop, name="resync", daemon=True).start()
    log.info(
        "lmmr1 operator %s started: lease %s/%s, %s, resync every %.1fs, %d workers, "
        "API %.0f QPS (burst %d)",
        SETTINGS.identity,
        SETTINGS.operator_namespace,
        SETTINGS.lease_name,
        describe_scope(SETTINGS),
        SETTINGS.resync_seconds,
        SETTINGS.workers,
        SETTINGS.api_qps,
        SETTINGS.api_burst,
    )


@kopf.on.cleanup()
def shutdown(**_: Any) -> None:
    _State.stopping.set()
    if _State.queue is not None:
        _State.queue.shutdown()
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
    kube = _State.kube
    if type == "DELETED":
        _State.runs.remove(namespace, name)
        if kube is not None:
            kube.forget_run(namespace, name, body.metadata.get("resourceVersion"))
        _enqueue(namespace, name)  # the controller forgets the run's metrics and state
        return
    # Every replica keeps the index and the run cache (kopf lists the runs when it starts
    # watching), so a new leader knows every run at once.
    run = cast(dict[str, Any], dict(body))
    _State.runs.update(run)
    if kube is not None:
        kube.saw_run(run)
    controller = _State.controller
    if controller is not None and controller.wrote(
        namespace, name, body.metadata.get("resourceVersion")
    ):
        return  # the operator's own status write: nothing the pass that wrote it did not see
    _enqueue(namespace, name)
