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

from pydantic import ValidationError

from lmmr1_operator import checkpoints, naming
from lmmr1_operator.api.spec import LMMR1RunSpec
from lmmr1_operator.kube import Kube
from lmmr1_operator.metrics import Metrics
from lmmr1_operator.reconcile import Observed, Plan, decide
from lmmr1_operator.settings import OperatorSettings
from lmmr1_trainer.config import PROGRESS_KEY, Progress

Obj = dict[str, Any]
EventSink = Callable[[Obj, str, str, str], None]  # (run, type, reason, message)
log = logging.getLogger("lmmr1.controller")

# Children that belong to a stage; a finished or restarting stage loses all of them.
_STAGE_CHILDREN = (
    ("Job", "trainer"),
    ("Pod", "rollout"),
    ("Service", "rollout"),
    ("Service", "trainer"),
    ("NetworkPolicy", "rollout"),
    ("ConfigMap", "config"),
)


class Controller:
    def __init__(
        self, kube: Kube, settings: OperatorSettings, metrics: Metrics, post_event: EventSink
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.metrics = metrics
        self.post_event = post_event
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

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
                    return
                self._reconcile(run)
            finally:
                self.metrics.reconcile_seconds.observe(time.monotonic() - started)

    def _reconcile(self, run: Obj) -> None:
        seen = self.observe(run)
        plan = decide(seen, self.settings)
        if plan.check_final_checkpoint:
            committed = self.checkpoint_committed(run, plan.check_final_checkpoint)
            plan = decide(
                dataclasses.replace(seen, final_checkpoint_committed=committed), self.settings
            )
        self.act(run, plan)

    # -- observe -----------------------------------------------------------------------

    def observe(self, run: Obj) -> Observed:
        meta = run["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        spec = LMMR1RunSpec.model_validate(run["spec"])
        index = (run.get("status") or {}).get("stageIndex") or 0
        stage = spec.stages[min(index, len(spec.stages) - 1)].name
        live = [
            p
            for p in self.kube.list("Pod", namespace, naming.stage_labels(name, stage, "rollout"))
            if not p["metadata"].get("deletionTimestamp")
        ]
        job = self.kube.get("Job", namespace, naming.trainer_job(name, stage))
        if job and job["metadata"].get("deletionTimestamp"):
            job = None
        trainer_pods: list[Obj] = []
        if job is not None:
            uid = job["metadata"]["uid"]
            trainer_pods = [
                p
                for p in self.kube.list("Pod", namespace, {"job-name": job["metadata"]["name"]})
                if any(o.get("uid") == uid for o in p["metadata"].get("ownerReferences", []))
            ]
        config = self.kube.get("ConfigMap", namespace, naming.stage_config(name, stage))
        token_secret = self.kube.get("Secret", namespace, naming.token_secret(name))
        secret = spec.storage.credentials_secret or self.settings.default_s3_secret
        missing = secret if secret and self.kube.get("Secret", namespace, secret) is None else None
        return Observed(
            run=run,
            now=dt.datetime.now(dt.UTC),
            token=secrets.token_urlsafe(32) if token_secret is None else "",
            service_account=spec.service_account_name or "default",
            credentials_missing=missing,
            rollout_pods=live,
            job=job,
            trainer_pods=trainer_pods,
            config=config,
            progress=self.progress(namespace, name),
            stage_children_exist=bool(live or job or config),
        )

    def progress(self, namespace: str, name: str) -> Progress | None:
        configmap = self.kube.get("ConfigMap", namespace, naming.progress_configmap(name))
        raw = ((configmap or {}).get("data") or {}).get(PROGRESS_KEY)
        if not raw or raw == "{}":
            return None
        try:
            return Progress.model_validate_json(raw)
        except ValidationError as err:
            log.warning(
                "run %s/%s: ignoring malformed progress report: %s",
                namespace,
                name,
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

    def act(self, run: Obj, plan: Plan) -> None:
        meta = run["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if plan.delete_run:
            log.info("run %s/%s: ttlSecondsAfterFinished passed, deleting it", namespace, name)
            self.kube.delete_run(namespace, name)
            self.metrics.forget(namespace, name)
            return
        if plan.delete_stage:
            for kind, role in _STAGE_CHILDREN:
                for child in self.kube.list(
                    kind, namespace, {naming.LABEL_RUN: name, naming.LABEL_ROLE: role}
                ):
                    self.kube.delete(kind, namespace, child["metadata"]["name"])
        for obj in plan.ensure:
            if plan.delete_stage and naming.LABEL_STAGE in obj["metadata"]["labels"]:
                continue
            self.kube.ensure(obj)
        for obj in plan.replace:
            if not plan.delete_stage:
                self.kube.replace(obj)
        old = run.get("status") or {}
        if _comparable(old) != _comparable(plan.status):
            self.kube.patch_status(namespace, name, plan.status)
        for kind, reason, message in plan.events:
            self.post_event(run, kind, reason, message)
            if reason == "StageRestarting":
                self.metrics.restarts.inc()
        self.metrics.observe_phase(namespace, name, plan.status.get("phase"))


def _comparable(status: Obj) -> str:
    return json.dumps({k: v for k, v in status.items() if v is not None}, sort_keys=True)
