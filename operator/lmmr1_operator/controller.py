"""One reconcile of one run: observe (read the run and its children), decide (pure, in
`reconcile`), act (create/delete children, patch status, post events). Serialised per run,
so a timer tick and a child's event never act on the same run at once."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes.dynamic.exceptions import ConflictError
from pydantic import ValidationError

from lmmr1_operator import checkpoints, kueue, naming, podstate
from lmmr1_operator.api.spec import LMMR1RunSpec
from lmmr1_operator.api.status import StageStatus
from lmmr1_operator.children import jobset as jobset_builder
from lmmr1_operator.kube import CreateRefused, Kube
from lmmr1_operator.metrics import Metrics
from lmmr1_operator.reconcile import (
    DISRUPTED,
    RESTART_REASONS,
    CreateFailure,
    Observed,
    Plan,
    decide,
)
from lmmr1_operator.settings import OperatorSettings
from lmmr1_operator.verification import CheckpointVerifier
from lmmr1_trainer.config import PROGRESS_KEY, Progress

Obj = dict[str, Any]
CONFLICT_RETRY_S = 1.0
EventSink = Callable[[Obj, str, str, str], None]  # (run, type, reason, message)
log = logging.getLogger("lmmr1.controller")

# Children that belong to a stage; a finished or restarting stage loses all of them.
_STAGE_CHILDREN = (
    ("Job", "trainer"),
    ("Pod", "rollout"),
    ("Service", "rollout"),
    ("Service", "trainer"),
    ("NetworkPolicy", "rollout"),
    ("NetworkPolicy", "trainer"),
    ("ConfigMap", "config"),
)
# ... and on the JobSet path (spec.queueName) the attempt's JobSet, which owns its Jobs,
# their pods and its headless Service (deleting it deletes them).
_GANG_CHILDREN = ((jobset_builder.KIND, jobset_builder.ROLE),)


def _controlled_by(obj: Obj, kind: str) -> bool:
    """Whether `obj`'s controller is an object of `kind` (a JobSet's Job, a Job's pod)."""
    refs = obj["metadata"].get("ownerReferences") or []
    return any(ref.get("kind") == kind and ref.get("controller") for ref in refs)


class Controller:
    def __init__(
        self,
        kube: Kube,
        settings: OperatorSettings,
        metrics: Metrics,
        post_event: EventSink,
        requeue: Callable[[str, str], None] | None = None,
        retry_later: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.metrics = metrics
        self.post_event = post_event
        # Final-checkpoint checks run off the reconcile path; each answer reconciles its
        # run again (through `requeue`: the handlers check leadership first).
        self.verifier = CheckpointVerifier(requeue or self.reconcile)
        # A status write that lost to a newer version of the run (read from a cache that
        # was behind) is decided again shortly, on the newer run.
        self.retry_later = retry_later or (lambda namespace, name, seconds: None)
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # What the API server refused on each run's last pass (an observation like any
        # other: every pass tries again, so a new leader finds out for itself).
        self._refused: dict[tuple[str, str], list[CreateFailure]] = {}
        # The error that ended each run's last pass: the next pass shows it on the run.
        self._errors: dict[tuple[str, str], str] = {}
        # The resourceVersion of each run's last status write by this operator: the watch
        # event it causes carries nothing new, so it triggers no pass (`wrote`).
        self._written: dict[tuple[str, str], str] = {}

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def reconcile(self, namespace: str, name: str) -> None:
        with self._lock(namespace, name):
            started = time.monotonic()
            try:
                run = self.kube.get("LMMR1Run", namespace, name)
                if run is None or run["metadata"].get("deletionTimestamp"):
                    self.metrics.forget(namespace, name)
                    self._refused.pop((namespace, name), None)
                    self._errors.pop((namespace, name), None)
                    self._written.pop((namespace, name), None)
                    self.verifier.forget(namespace, name)
                    return
                before = self._refused.get((namespace, name), [])
                try:
                    self._reconcile(run)
                except Exception as err:
                    self.metrics.reconcile_errors.labels(type(err).__name__).inc()
                    self._errors[(namespace, name)] = f"{type(err).__name__}: {err}"
                    raise
                if self._refused.get((namespace, name), []) != before:
                    # A child was refused (or is no longer): show it now, not a pass later.
                    run = self.kube.get("LMMR1Run", namespace, name)
                    if run is not None and not run["metadata"].get("deletionTimestamp"):
                        self._reconcile(run)
            finally:
                self.metrics.reconcile_seconds.observe(time.monotonic() - started)

    def wrote(self, namespace: str, name: str, resource_version: str | None) -> bool:
        """Whether the run at `resource_version` is this operator's own last status write
        (then its watch event needs no pass: the pass that wrote it decided on the rest)."""
        return resource_version is not None and self._written.get((namespace, name)) == (
            resource_version
        )

    def _reconcile(self, run: Obj) -> None:
        seen, stale = self.observe(run)
        plan = decide(seen, self.settings)
        uri = plan.check_final_checkpoint
        if uri:
            meta = run["metadata"]
            verdict = self.verifier.verdict(
                (meta["namespace"], meta["name"], meta["uid"]),
                uri,
                lambda: self.checkpoint_committed(run, uri),
            )
            if verdict is not None:
                checked = dataclasses.replace(
                    seen,
                    final_checkpoint_committed=verdict.committed,
                    final_checkpoint_error=verdict.error or None,
                )
                plan = decide(checked, self.settings)
        self.act(run, plan, stale)
        if plan.recheck_after is not None and not plan.delete_run:
            meta = run["metadata"]
            self.retry_later(meta["namespace"], meta["name"], plan.recheck_after)

    # -- observe -----------------------------------------------------------------------

    def observe(self, run: Obj) -> tuple[Observed, list[tuple[str, str]]]:
        """What the run's children look like, and which children are stale (of an earlier
        stage or attempt, left by a restart or by an operator that died mid-way)."""
        meta = run["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        spec = LMMR1RunSpec.model_validate(run["spec"])
        status = run.get("status") or {}
        index = min(status.get("stageIndex") or 0, len(spec.stages) - 1)
        stage = spec.stages[index].name
        records = status.get("stages") or []
        attempt = str(
            StageStatus.model_validate(records[index]).attempt if index < len(records) else 0
        )

        def current(obj: Obj) -> bool:
            labels = obj["metadata"].get("labels") or {}
            return (
                labels.get(naming.LABEL_STAGE) == stage
                and labels.get(naming.LABEL_ATTEMPT) == attempt
            )

        # Children count only if this run owns them (see `naming.owned_by`); another's of
        # the same name (a deleted run's awaiting collection, an orphan) is reported.
        taken: dict[tuple[str, str], CreateFailure] = {}

        def mine(kind: str, obj: Obj | None) -> Obj | None:
            if obj is None or naming.owned_by(obj, uid):
                return obj
            child = obj["metadata"]["name"]
            taken[(kind, child)] = CreateFailure(kind, child, "NameTaken", naming.name_taken(obj))
            return None

        def alive(kind: str, obj: Obj) -> bool:
            return mine(kind, obj) is not None and not obj["metadata"].get("deletionTimestamp")

        owned = {naming.LABEL_RUN: name, naming.LABEL_MANAGED: naming.MANAGER}
        # A rollout pod on its way out because Kubernetes disrupted it stays in view: the
        # stage restarts for it (a disruption), not only once a new one has replaced it.
        # The JobSet path's rollout pods belong to a Job and its Jobs to a JobSet (read
        # below through the JobSet): neither is the run's own child, nor someone else's.
        rollout_pods = [
            p
            for p in self.kube.list("Pod", namespace, {**owned, naming.LABEL_ROLE: "rollout"})
            if not _controlled_by(p, "Job")
            and (alive("Pod", p) or (mine("Pod", p) is not None and podstate.disruption(p)))
        ]
        jobs = [
            j
            for j in self.kube.list("Job", namespace, owned)
            if not _controlled_by(j, jobset_builder.KIND) and alive("Job", j)
        ]
        # The attempt's children are known by owner and attempt label, never by name: an
        # older attempt's Job and pods (their names carry their own attempt) are stale and
        # deleted, and none of them is read as the current attempt's (its Complete or Failed
        # condition ends nothing).
        stale = [("Pod", p["metadata"]["name"]) for p in rollout_pods if not current(p)]
        stale += [("Job", j["metadata"]["name"]) for j in jobs if not current(j)]
        # An operator before attempt-named Jobs made the trainer Service select one Job's
        # pods by name (`job-name`); after an upgrade that selector would miss every later
        # attempt's ranks. It goes, and the next pass creates it with the stage's selector.
        service = naming.trainer_service(name, stage)
        held = mine("Service", self.kube.get("Service", namespace, service))
        wanted = naming.stage_labels(name, stage, "trainer")
        if held is not None and (held.get("spec") or {}).get("selector") != wanted:
            stale.append(("Service", service))
        job = next((j for j in jobs if current(j)), None)
        trainer_pods: list[Obj] = []
        refused = list(self._refused.get((namespace, name), []))
        if job is not None:
            trainer_pods = self._job_pods(namespace, job, refused)
        # The JobSet path (spec.queueName): the attempt's JobSet, Kueue's Workload for it,
        # its Jobs and their pods. Never read for a run without a queue: the cluster may
        # lack the JobSet and Kueue CRDs.
        jobset: Obj | None = None
        workload: Obj | None = None
        jobset_jobs: list[Obj] = []
        jobsets: list[Obj] = []
        if spec.queue_name:
            owned_jobsets = self.kube.list(jobset_builder.KIND, namespace, owned)
            jobsets = [js for js in owned_jobsets if alive(jobset_builder.KIND, js)]
            stale += [
                (jobset_builder.KIND, js["metadata"]["name"]) for js in jobsets if not current(js)
            ]
            jobset = next((js for js in jobsets if current(js)), None)
        if jobset is not None:
            meta_js = jobset["metadata"]
            workload = kueue.workload_for(
                jobset,
                self.kube.list("Workload", namespace, {kueue.JOB_UID_LABEL: meta_js["uid"]}),
            )
            jobset_jobs = [
                j
                for j in self.kube.list("Job", namespace, owned)
                if naming.owned_by(j, meta_js["uid"]) and not j["metadata"].get("deletionTimestamp")
            ]
            for child in jobset_jobs:
                pods = self._job_pods(namespace, child, refused)
                if (child["metadata"].get("labels") or {}).get(naming.LABEL_ROLE) == "rollout":
                    rollout_pods += pods
                else:
                    trainer_pods += pods
        config = mine(
            "ConfigMap", self.kube.get("ConfigMap", namespace, naming.stage_config(name, stage))
        )
        token_secret = mine("Secret", self.kube.get("Secret", namespace, naming.token_secret(name)))
        secret = spec.storage.credentials_secret or self.settings.default_s3_secret
        missing = None
        if secret and self.kube.get("Secret", namespace, secret) is None:
            missing = secret
        progress = self.progress(
            mine(
                "ConfigMap", self.kube.get("ConfigMap", namespace, naming.progress_configmap(name))
            )
        )
        known = {(r.kind, r.name) for r in refused}
        refused += [f for key, f in taken.items() if key not in known]
        seen = Observed(
            run=run,
            now=dt.datetime.now(dt.UTC),
            token=secrets.token_urlsafe(32) if token_secret is None else "",
            service_account=spec.service_account_name or "default",
            credentials_missing=missing,
            rollout_pods=[p for p in rollout_pods if current(p)],
            job=job,
            jobset=jobset,
            workload=workload,
            jobset_jobs=jobset_jobs,
            trainer_pods=trainer_pods,
            config=config,
            progress=progress,
            stage_children_exist=bool(rollout_pods or jobs or config or jobsets),
            create_failures=refused,
            reconcile_error=self._errors.pop((namespace, name), None),
        )
        return seen, stale

    def _job_pods(self, namespace: str, job: Obj, refused: list[CreateFailure]) -> list[Obj]:
        """The Job's pods (by its job-name label and its UID as their owner); and, while it
        is short of pods, why its controller could not create them (Pod Security, a quota:
        only its FailedCreate Events say so), added to `refused`."""
        job_uid = job["metadata"]["uid"]
        pods = [
            p
            for p in self.kube.list("Pod", namespace, {"job-name": job["metadata"]["name"]})
            if naming.owned_by(p, job_uid)
        ]
        spec = job.get("spec") or {}
        # A suspended Job (its JobSet evicted by Kueue) has no pods on purpose.
        if not spec.get("suspend") and len(pods) < int(spec.get("parallelism") or 1):
            why = podstate.job_create_failure(
                job, pods, self.kube.events(namespace, job_uid, "FailedCreate")
            )
            if why:
                refused.append(CreateFailure("Job", job["metadata"]["name"], "FailedCreate", why))
        return pods

    @staticmethod
    def progress(configmap: Obj | None) -> Progress | None:
        if configmap is None:
            return None
        raw = (configmap.get("data") or {}).get(PROGRESS_KEY)
        if not raw or raw == "{}":
            return None
        try:
            return Progress.model_validate_json(raw)
        except ValidationError as err:
            log.warning(
                "ignoring malformed progress report %s/%s: %s",
                configmap["metadata"]["namespace"],
                configmap["metadata"]["name"],
                err.errors()[0]["msg"],
            )
            return None

    def checkpoint_committed(self, run: Obj, uri: str) -> bool:
        spec = LMMR1RunSpec.model_validate(run["spec"])
        secret_name = spec.storage.credentials_secret or self.settings.default_s3_secret
        secret = (
            self.kube.get("Secret", run["metadata"]["namespace"], secret_name)
            if secret_name
            else None
        )
        return checkpoints.manifest_exists(
            uri,
            spec.storage.endpoint or self.settings.default_s3_endpoint,
            spec.storage.region or self.settings.default_s3_region,
            secret,
        )

    # -- act ---------------------------------------------------------------------------

    def act(self, run: Obj, plan: Plan, stale: list[tuple[str, str]]) -> None:
        """Status first, guarded by the run's resourceVersion: if another actor (a second
        replica during a peering hand-over, or kopf's own bookkeeping) changed the run since
        it was read, nothing happens and the next pass decides again on fresh data. Events
        and deletions follow only a successful status write, so none happens twice."""
        meta = run["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        if plan.delete_run:
            log.info("run %s/%s: ttlSecondsAfterFinished passed, deleting it", namespace, name)
            self.kube.delete_run(namespace, name)
            self.metrics.forget(namespace, name)
            return
        if _comparable(run.get("status") or {}) != _comparable(plan.status):
            try:
                version = self.kube.patch_status(
                    namespace, name, plan.status, resource_version=meta["resourceVersion"]
                )
                if version:
                    self._written[(namespace, name)] = version
            except ConflictError:
                log.debug("run %s/%s changed while reconciling; deciding again", namespace, name)
                self.retry_later(namespace, name, CONFLICT_RETRY_S)
                return
        for kind, reason, message in plan.events:
            self.post_event(run, kind, reason, message)
            if reason in RESTART_REASONS:
                self.metrics.restarts.inc()
            elif reason == DISRUPTED:
                self.metrics.disruptions.inc()
        for kind, child in stale:
            self.kube.delete(kind, namespace, child)
        refused: list[CreateFailure] = []
        if plan.delete_stage:
            queued = bool((run.get("spec") or {}).get("queueName"))
            for kind, role in _STAGE_CHILDREN + (_GANG_CHILDREN if queued else ()):
                labels = {naming.LABEL_RUN: name, naming.LABEL_ROLE: role}
                for obj in self.kube.list(kind, namespace, labels):
                    if naming.owned_by(obj, uid):
                        self.kube.delete(kind, namespace, obj["metadata"]["name"])
        else:
            for obj in plan.replace:
                self._create(self.kube.replace, obj, refused)
        for obj in plan.ensure:
            if plan.delete_stage and naming.LABEL_STAGE in obj["metadata"]["labels"]:
                continue
            self._create(self.kube.ensure, obj, refused)
        self._refused[(namespace, name)] = refused
        self.metrics.observe_phase(namespace, name, plan.status.get("phase"))
        self.metrics.observe_evaluation(namespace, name, plan.status.get("stages") or [])

    def _create(
        self, create: Callable[[Obj], object], obj: Obj, refused: list[CreateFailure]
    ) -> None:
        """Create one child; a refusal is noted (the run's status and a Warning Event show
        it on the next decision) and the other children are still created."""
        try:
            create(obj)
        except CreateRefused as err:
            meta = obj["metadata"]
            log.warning(
                "%s %s/%s refused: %s: %s",
                err.kind,
                meta["namespace"],
                meta["name"],
                err.reason,
                err.message,
            )
            refused.append(CreateFailure(err.kind, err.name, err.reason, err.message))
            self.metrics.create_failures.labels(err.kind, err.reason).inc()


def _comparable(status: Obj) -> str:
    return json.dumps({k: v for k, v in status.items() if v is not None}, sort_keys=True)
