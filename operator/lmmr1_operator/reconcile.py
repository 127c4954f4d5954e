"""The run's state machine (pure): what the operator saw -> what it should do.

`decide()` is called for every run every few seconds and whenever a child changes. It
must be idempotent: the plan for an unchanged world is "create what is missing (nothing),
patch the same status". All memory lives in the run's status and in its children, so an
operator killed at any point continues where it stopped.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from lmmr1_operator import conditions as cond
from lmmr1_operator import gang, naming, podstate
from lmmr1_operator.api.spec import LMMR1RunSpec, resolved_rollout_mode, stall_timeout
from lmmr1_operator.api.status import LMMR1RunStatus, StageStatus
from lmmr1_operator.children import access, jobset, rollout, stage_config, trainer
from lmmr1_operator.children.context import StageContext, init_weights
from lmmr1_operator.evaluation import headline, stage_evaluation
from lmmr1_operator.naming import ANNOTATION_REPLICA, ROLLOUT_PORT
from lmmr1_operator.settings import OperatorSettings
from lmmr1_operator.verification import RETRY_AFTER_S
from lmmr1_trainer.config import EXIT_CONFIG_ERROR, Progress

Obj = dict[str, Any]
MAX_BACKOFF_S = 300.0
MAX_REFUSAL_CHARS = 1000
MAX_ERROR_CHARS = 1000
# Event reasons of a stage restart: a failed pod or Job, or the stall watchdog.
RESTARTING = "StageRestarting"
STALLED = "Stalled"
RESTART_REASONS = (RESTARTING, STALLED)
# Condition and Event reason of a restart after Kubernetes ended a pod (DisruptionTarget):
# not counted against backoffLimit, as a Job's podFailurePolicy rule `action: Ignore`.
DISRUPTED = "Disrupted"


@dataclass(frozen=True)
class CreateFailure:
    """A child the API server refused to create (any 4xx but 409 AlreadyExists and 429),
    or the trainer Job's pods its controller could not create (its FailedCreate Events)."""

    kind: str
    name: str
    reason: str  # the API server's reason (Forbidden, Invalid, ...) or FailedCreate
    message: str  # the API server's message: which admission plugin or quota, and why

    def describe(self) -> str:
        return f"{self.kind} {self.name}: {self.message[:MAX_REFUSAL_CHARS]}"


@dataclass(frozen=True)
class Observed:
    """Everything the operator read for one run; children are the current stage's."""

    run: Obj
    now: dt.datetime
    token: str  # the rollout token to use if the Secret does not exist yet
    service_account: str
    credentials_missing: str | None = None  # the missing Secret's name
    # The current attempt's (by owner and attempt label, never by name alone).
    rollout_pods: list[Obj] = field(default_factory=list)
    job: Obj | None = None  # the current attempt's trainer Job, if it exists
    trainer_pods: list[Obj] = field(default_factory=list)
    config: Obj | None = None
    progress: Progress | None = None
    final_checkpoint_committed: bool | None = None  # checked only once the Job completed
    final_checkpoint_error: str | None = None  # the check itself failed (S3 unreachable, ...)
    stage_children_exist: bool = False
    # What the API server refused on the operator's last attempt to create children, and
    # why the current trainer Job has no pods (its FailedCreate Events).
    create_failures: list[CreateFailure] = field(default_factory=list)
    reconcile_error: str | None = None  # what ended the operator's previous pass, if raised
    # The JobSet path (spec.queueName): the attempt's JobSet, Kueue's Workload for it, and
    # the JobSet's Jobs (their pods are trainer_pods and rollout_pods; `job` stays None).
    jobset: Obj | None = None
    workload: Obj | None = None
    jobset_jobs: list[Obj] = field(default_factory=list)


@dataclass
class Plan:
    ensure: list[Obj] = field(default_factory=list)  # create when absent
    replace: list[Obj] = field(default_factory=list)  # create, or replace when different
    delete_stage: bool = False  # remove the current stage's children
    delete_run: bool = False  # ttlSecondsAfterFinished expired
    status: Obj = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, msg)
    check_final_checkpoint: str | None = None  # ask the caller to verify this in S3
    # Seconds until time alone changes the decision (a back-off ends, the deadline, the
    # stall watchdog, the TTL): the caller decides again then, with no event needed.
    recheck_after: float | None = None


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


class _Decision:
    """One pass of the state machine; mutates its own copy of the status."""

    def __init__(self, seen: Observed, settings: OperatorSettings) -> None:
        self.seen = seen
        self.settings = settings
        self.spec = LMMR1RunSpec.model_validate(seen.run["spec"])
        self.status = LMMR1RunStatus.model_validate(seen.run.get("status") or {})
        self.now = _iso(seen.now)
        self.generation = seen.run["metadata"].get("generation")
        self.plan = Plan()

    # -- helpers -------------------------------------------------------------------------

    def event(self, reason: str, message: str, kind: str = "Normal") -> None:
        self.plan.events.append((kind, reason, message))

    def condition(self, kind: str, true: bool, reason: str, message: str = "") -> None:
        self.status.conditions = cond.set_condition(
            self.status.conditions, kind, true, reason, message, self.now, self.generation
        )

    def finish(self, succeeded: bool, reason: str, message: str) -> None:
        if self.status.suspended_since is not None:  # a deadline shortened while suspended
            self.status.suspended_seconds = int(self.suspended_seconds())
            self.status.suspended_since = None
        self.status.phase = "Succeeded" if succeeded else "Failed"
        self.status.completion_time = self.now
        self.condition(cond.RUNNING, False, reason, message)
        self.condition(cond.COMPLETE, succeeded, reason, message)
        self.condition(cond.FAILED, not succeeded, reason, message)
        self.condition(cond.BLOCKED, False, reason)
        self.plan.delete_stage = True
        self.event(reason, message, "Normal" if succeeded else "Warning")

    @property
    def index(self) -> int:
        return self.status.stage_index or 0

    def record(self) -> StageStatus:
        while len(self.status.stages) <= self.index:
            self.status.stages.append(
                StageStatus(name=self.spec.stages[len(self.status.stages)].name)
            )
        return self.status.stages[self.index]

    def context(self) -> StageContext:
        finals = [s.final_checkpoint for s in self.status.stages]
        return StageContext(
            attempt=self.record().attempt,
            run=self.seen.run,
            spec=self.spec,
            index=self.index,
            settings=self.settings,
            init_from=init_weights(self.spec, self.index, finals),
        )

    # -- the decision ----------------------------------------------------------------------

    def decide(self) -> Plan:
        status = self.status
        status.observed_generation = self.generation
        self.show_reconcile_error()
        if status.phase in ("Succeeded", "Failed"):
            self.after_finish()
            return self.done()
        if status.phase is None:
            status.phase = "Pending"
            status.start_time = self.now
            status.stage_index = 0
            status.restarts = 0
            self.event(
                "Created", f"run accepted with stages {', '.join(s.name for s in self.spec.stages)}"
            )
        deadline = self.spec.active_deadline_seconds
        active = self.active_seconds()
        if deadline and active is not None and active > deadline:
            suspended = self.suspended_seconds()
            paused = "suspended or queued" if self.spec.queue_name else "suspended"
            self.finish(
                False,
                "DeadlineExceeded",
                f"activeDeadlineSeconds={deadline} passed ({active:.0f}s active"
                + (f", {suspended:.0f}s {paused} not counted" if suspended else "")
                + f"); stopped at stage {self.record().name} step {status.step or 0}",
            )
            return self.done()
        if self.spec.suspend:
            self.suspend()
            return self.done()
        if status.phase == "Suspended":
            status.suspended_seconds = int(self.suspended_seconds())
            status.suspended_since = None
            status.phase = "Running" if (status.step or self.index) else "Pending"
            self.condition(cond.SUSPENDED, False, "Resumed", "resumed from the last checkpoint")
            self.event("Resumed", f"stage {self.record().name} resumes from its last checkpoint")
        self.condition(cond.SUSPENDED, False, "NotSuspended")
        if self.seen.credentials_missing:
            message = (
                f"Secret {self.seen.credentials_missing!r} (spec.storage."
                "credentialsSecret) not found in this namespace: create it with keys "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
            if not cond.is_true(status.conditions, cond.BLOCKED):
                self.event("SecretNotFound", message, "Warning")
            self.condition(cond.BLOCKED, True, "SecretNotFound", message)
            return self.done()
        retry_after = _parse(status.retry_after)
        if retry_after and self.seen.now < retry_after:
            return self.done()
        status.retry_after = None
        self.run_stage()
        return self.done()

    def show_reconcile_error(self) -> None:
        """An exception in the operator's previous pass (an API or S3 error; it is retried)
        shows on the run, not only in the operator's log: a condition, one Warning Event
        per distinct error."""
        error = self.seen.reconcile_error
        previous = cond.get(self.status.conditions, cond.RECONCILED)
        if error:
            message = f"the operator's last pass failed and is retried: {error[:MAX_ERROR_CHARS]}"
            if previous is None or previous.message != message:
                self.event("ReconcileError", message, "Warning")
            self.condition(cond.RECONCILED, False, "ReconcileError", message)
        elif previous is not None and previous.status == "False":
            self.condition(
                cond.RECONCILED, True, "Reconciled", "the operator's last pass succeeded"
            )

    def after_finish(self) -> None:
        if self.seen.stage_children_exist:
            self.plan.delete_stage = True
        ttl = self.spec.ttl_seconds_after_finished
        finished = _parse(self.status.completion_time)
        if ttl is not None and finished and (self.seen.now - finished).total_seconds() >= ttl:
            self.plan.delete_run = True

    def suspended_seconds(self) -> float:
        """Time the run spent suspended: earlier suspensions and the current one so far."""
        since = _parse(self.status.suspended_since)
        current = (self.seen.now - since).total_seconds() if since else 0.0
        return (self.status.suspended_seconds or 0) + max(current, 0.0)

    def active_seconds(self) -> float | None:
        """What activeDeadlineSeconds counts: time since the run started, less the time it
        spent suspended (its clock stops while suspended; a Job's restarts from zero on
        resume instead). None before the run started."""
        start = _parse(self.status.start_time)
        if start is None:
            return None
        return (self.seen.now - start).total_seconds() - self.suspended_seconds()

    def suspend(self) -> None:
        if self.status.suspended_since is None:
            self.status.suspended_since = self.now
        if self.status.phase != "Suspended":
            self.event(
                "Suspended",
                f"pods of stage {self.record().name} stopped; the run "
                "resumes from its last checkpoint when unsuspended",
            )
        self.status.phase = "Suspended"
        self.status.last_progress_time = None  # the pods are gone; the clock restarts with them
        self.condition(cond.SUSPENDED, True, "Suspended", "spec.suspend is true")
        self.condition(cond.RUNNING, False, "Suspended")
        if self.spec.queue_name:
            gang.suspended(self)
        self.plan.delete_stage = self.seen.stage_children_exist

    def run_stage(self) -> None:
        seen, record, ctx = self.seen, self.record(), self.context()
        if record.phase == "Pending":
            record.phase = "Running"
            record.start_time = self.now
            record.init_checkpoint = ctx.init_from
            self.status.stage = record.name
            self.event(
                "StageStarted",
                f"stage {record.name} ({ctx.stage.type}) starts from {ctx.init_from}",
            )
        self.status.stage = record.name
        record.rollout_mode = resolved_rollout_mode(ctx.stage.resources)
        separate = record.rollout_mode == "separate"
        self.apply_progress(record)
        self.plan.ensure += [
            # The trainer mounts the token in either mode; only rollout servers check it.
            access.token_secret(seen.run, seen.token),
            access.progress_configmap(seen.run),
            access.progress_role(seen.run),
            access.progress_binding(seen.run, seen.service_account),
            # Before any pod, so none accepts traffic its policy would refuse.
            access.trainer_network_policy(ctx),
        ]
        if self.spec.queue_name:  # gang admission: the attempt is one JobSet
            gang.run_stage(self, ctx, record)
            return
        if separate:
            self.plan.ensure += [
                access.rollout_network_policy(ctx),
                rollout.service(ctx),
                *(rollout.pod(ctx, r) for r in self.missing_replicas(ctx)),
            ]
        if self.failed(ctx) or self.stalled(ctx):
            return
        # Colocated engines live in the trainer's ranks: nothing to wait for.
        urls = self.rollout_urls(ctx) if separate else []
        config = stage_config.configmap(ctx, urls)
        have = (seen.config or {}).get("data", {})
        if seen.config is None or (urls is not None and have != config["data"]):
            self.plan.replace.append(config)
        if urls is not None:
            self.plan.ensure.append(trainer.service(ctx))
            if seen.job is None:
                self.plan.ensure.append(trainer.job(ctx))
        if podstate.job_condition(seen.job, "Complete"):
            self.complete_stage(record)
            return
        self.progressing(record)

    def progressing(self, record: StageStatus) -> None:
        """The attempt's children exist (or are being created): Blocked from what was refused
        or what keeps a pod from starting, Running once a trainer pod runs."""
        seen = self.seen
        refused = self.creation()
        stuck = refused or podstate.why_stuck([*seen.rollout_pods, *seen.trainer_pods])
        if stuck:
            if not refused and not cond.is_true(self.status.conditions, cond.BLOCKED):
                self.event(stuck[0], stuck[1], "Warning")
            self.condition(cond.BLOCKED, True, *stuck)
        else:
            self.condition(cond.BLOCKED, False, "Progressing")
        if any(podstate.phase(p) == "Running" for p in seen.trainer_pods):
            self.status.phase = "Running"
        if self.status.phase == "Running":
            self.condition(cond.RUNNING, True, "StageRunning", f"stage {record.name}")
        else:
            self.condition(cond.RUNNING, False, "StageStarting", f"stage {record.name} starting")

    def missing_replicas(self, ctx: StageContext) -> list[int]:
        """The rollout replicas the attempt has no pod for. The attempt's pods are known by
        their owner and attempt label (the observation's), whatever their names: an
        attempt's children never get a second copy under another name (an attempt that
        began under an operator that named its children otherwise keeps them)."""
        have = {
            (p["metadata"].get("annotations") or {}).get(ANNOTATION_REPLICA)
            for p in self.seen.rollout_pods
        }
        replicas = range(ctx.stage.resources.rollout.replicas)
        return [r for r in replicas if str(r) not in have]

    def lost_rollout_pods(self, ctx: StageContext) -> list[str]:
        """Rollout pods of the attempt that are gone although its trainer Job exists. The
        Job is created only once every replica is Ready, so a replica without a pod beside
        it was lost, not yet to be created: the trainer's server is gone, and recreating it
        would leave the trainer with the old URL. An eviction marks a pod and removes it
        within moments, often before a pass sees the mark, so such a loss is a disruption
        (the stage restarts from its last checkpoint, uncounted). None once the Job has
        completed: the servers are no longer needed."""
        if (
            resolved_rollout_mode(ctx.stage.resources) != "separate"
            or self.seen.job is None
            or podstate.job_condition(self.seen.job, "Complete")
        ):
            return []
        return [
            naming.rollout_pod(ctx.name, ctx.stage.name, ctx.attempt, replica)
            for replica in self.missing_replicas(ctx)
        ]

    def rollout_urls(self, ctx: StageContext) -> list[str] | None:
        """The rollout servers' URLs once every replica is Ready (None until then)."""
        ready = [p for p in self.seen.rollout_pods if podstate.is_ready(p)]
        if len(ready) != ctx.stage.resources.rollout.replicas:
            return None
        by_replica = sorted(ready, key=lambda p: p["metadata"]["name"])
        return [f"http://{p['status']['podIP']}:{ROLLOUT_PORT}" for p in by_replica]

    def creation(self) -> tuple[str, str] | None:
        """ChildrenCreated from what the API server refused: False (CreateFailed, its
        messages naming each child) with a Warning Event whenever another child is refused;
        True again once everything it refused was created."""
        failures = self.seen.create_failures
        previous = cond.get(self.status.conditions, cond.CHILDREN_CREATED)
        if not failures:
            if previous is not None and previous.status == "False":
                self.condition(
                    cond.CHILDREN_CREATED, True, "Created", "the API server accepted every child"
                )
            return None
        message = "; ".join(f.describe() for f in failures)
        known = previous is not None and previous.status == "False"
        if not known or not all(
            f"{f.kind} {f.name}:" in (previous.message if previous else "") for f in failures
        ):
            self.event("CreateFailed", message, "Warning")
        self.condition(cond.CHILDREN_CREATED, False, "CreateFailed", message)
        return "CreateFailed", message

    def apply_progress(self, record: StageStatus) -> None:
        progress, status = self.seen.progress, self.status
        if progress is None or progress.stage != record.name:
            return
        # A report of this stage that the status has not seen yet is progress. The last
        # attempt's report stays in the ConfigMap after a restart: it is no news.
        if (progress.step, progress.updated_at) != (status.step, status.last_report_time):
            status.last_progress_time = self.now
        status.last_report_time = progress.updated_at
        status.step, status.total_steps = progress.step, progress.total_steps
        status.progress = (
            f"{100 * progress.step // progress.total_steps}%" if progress.total_steps else None
        )
        status.reward, status.accuracy = progress.reward, progress.accuracy
        status.tokens_per_second = progress.tokens_per_second
        status.last_checkpoint = progress.last_checkpoint or status.last_checkpoint
        record.step, record.total_steps = progress.step, progress.total_steps
        record.reward, record.accuracy = progress.reward, progress.accuracy
        record.initial_reward = progress.initial_reward
        record.rollout_engine = progress.rollout_engine or record.rollout_engine
        record.skipped_rows = progress.skipped_rows
        if progress.evaluation is not None:
            record.evaluation = stage_evaluation(progress.evaluation)
            status.eval_accuracy, status.eval_gain = headline(record.evaluation)

    def stalled(self, ctx: StageContext) -> bool:
        """The stall watchdog: restart the stage (reason Stalled) when its trainer runs but
        has made no progress for its stall timeout. True when it did.

        The clock (status.lastProgressTime) starts once every trainer pod of the attempt is
        Running: pods waiting for a node or pulling an image are not stalled (that shows as
        Blocked). The resync loop decides again every few seconds, so the timeout fires
        with no event from the cluster."""
        status = self.status
        nodes = ctx.stage.resources.trainer.nodes
        running = [p for p in self.seen.trainer_pods if podstate.phase(p) == "Running"]
        if len(running) < nodes:
            return False
        if self.spec.queue_name and jobset.separate(ctx):
            # The JobSet path starts the trainer beside its rollout servers, and the trainer
            # waits for them (RolloutClient.wait_ready): vLLM loading a model, or its image
            # pulled on a fresh node, is not a stall. (The Job path makes the trainer only
            # once every rollout server is Ready.)
            ready = [p for p in self.seen.rollout_pods if podstate.is_ready(p)]
            if len(ready) < ctx.stage.resources.rollout.replicas:
                return False
        last = _parse(status.last_progress_time)
        if last is None:
            status.last_progress_time = self.now
            return False
        timeout = stall_timeout(self.spec, self.index)
        quiet = (self.seen.now - last).total_seconds()
        if not timeout or quiet <= timeout:
            return False
        progress = self.seen.progress
        reported = progress is not None and progress.stage == ctx.stage.name
        checkpoint = status.last_checkpoint or ""
        if not checkpoint.startswith(f"{ctx.checkpoint_uri}/"):
            checkpoint = ""  # the previous stage's: this one has committed none yet
        self.restart(
            ctx,
            f"trainer stalled: no progress for {quiet:.0f}s (stallTimeoutSeconds={timeout}) "
            f"since {status.last_progress_time}, "
            + (f"last at step {status.step}" if reported else "before its first step")
            + (f"; last checkpoint {checkpoint}" if checkpoint else ""),
            reason=STALLED,
        )
        return True

    def failed(self, ctx: StageContext) -> bool:
        """Handle a failed rollout or trainer pod. True when the stage is not running."""
        seen = self.seen
        pods = [*seen.rollout_pods, *seen.trainer_pods]
        if self.config_error(ctx, pods):
            return True
        # A pod Kubernetes ended (preempted, evicted, its node gone) is no failure of the
        # stage's, whatever its containers exited with; nor are the other ranks' failures
        # that follow when a peer vanishes under them. Nothing is counted.
        disrupted = self.disrupted_pods(pods)
        if disrupted:
            self.disrupted(ctx, disrupted)
            return True
        job_disruption = podstate.job_disruption(seen.job)
        if job_disruption is not None:  # the pod is gone; its Job says what happened
            self.disrupted(ctx, f"trainer Job failed: {job_disruption}")
            return True
        lost = self.lost_rollout_pods(ctx)
        if lost:
            self.disrupted(
                ctx,
                f"rollout pod {', '.join(lost)} gone while the trainer ran (removed before "
                "the operator saw how it ended, as an eviction, a drain or a lost node does)",
            )
            return True
        failed_pods = [p for p in pods if podstate.phase(p) == "Failed"]
        if not failed_pods and not podstate.job_condition(seen.job, "Failed"):
            return False
        self.restart(ctx, f"{podstate.describe_failed(failed_pods) or 'the trainer Job'} failed")
        return True

    def config_error(self, ctx: StageContext, pods: list[Obj]) -> bool:
        """Exit 78 from any container (trainer, verifier sidecar, rollout server) ends the
        run whatever the pod's phase: a sidecar is restarted in place and its pod never
        fails, and another attempt would meet the same configuration. True when it did."""
        for pod in pods:
            found = podstate.exited_with(pod, EXIT_CONFIG_ERROR)
            if found is not None:
                container, detail = found
                self.record().phase = "Failed"
                self.finish(
                    False,
                    "ConfigError",
                    f"stage {ctx.stage.name}: container {container} of pod "
                    f"{pod['metadata']['name']} rejected its configuration (exit "
                    f"{EXIT_CONFIG_ERROR}), retrying cannot help: "
                    f"{detail or f'see the {container} log'}",
                )
                return True
        return False

    @staticmethod
    def disrupted_pods(pods: list[Obj]) -> str:
        """The pods Kubernetes ended (DisruptionTarget), described; empty when none."""
        return ", ".join(
            f"pod {p['metadata']['name']} ended by Kubernetes ({reason}"
            + (f": {message}" if message else "")
            + ")"
            for p in pods
            if (found := podstate.disruption(p)) is not None
            for reason, message in [found]
        )

    def restart(self, ctx: StageContext, why: str, reason: str = RESTARTING) -> None:
        """A failed attempt: restart the stage from its last checkpoint after a back-off
        that doubles with each restart, or fail the run once backoffLimit is used up."""
        status, record = self.status, self.record()
        restarts = status.restarts or 0
        if restarts >= self.spec.backoff_limit:
            record.phase = "Failed"
            self.finish(
                False,
                "BackoffLimitExceeded",
                f"stage {ctx.stage.name}: {why}; backoffLimit="
                f"{self.spec.backoff_limit} restarts used",
            )
            return
        status.restarts = restarts + 1
        record.restarts += 1
        delay = min(MAX_BACKOFF_S, self.settings.restart_backoff_seconds * 2**restarts)
        self.tear_down(reason, why, delay)
        self.event(
            reason,
            f"stage {ctx.stage.name}: {why}; restart "
            f"{status.restarts}/{self.spec.backoff_limit} in "
            f"{delay:.0f}s from the last checkpoint",
            "Warning",
        )

    def disrupted(self, ctx: StageContext, why: str) -> None:
        """An attempt Kubernetes ended: restart the stage from its last checkpoint under a
        new attempt, counted in `disruptions` alone. The back-off neither grows nor counts
        (status.restarts, which drives both, is left alone), so a run on preemptible
        capacity is never failed for being preempted."""
        status, record = self.status, self.record()
        status.disruptions = (status.disruptions or 0) + 1
        record.disruptions += 1
        delay = min(MAX_BACKOFF_S, self.settings.restart_backoff_seconds)
        self.tear_down(DISRUPTED, why, delay)
        self.event(
            DISRUPTED,
            f"stage {ctx.stage.name}: {why}; restart in {delay:.0f}s from the last "
            f"checkpoint (disruption {status.disruptions}, not counted against "
            f"backoffLimit={self.spec.backoff_limit})",
        )

    def tear_down(self, reason: str, why: str, delay: float) -> None:
        """Remove the attempt's children; the next one starts once `delay` has passed."""
        self.status.retry_after = _iso(self.seen.now + dt.timedelta(seconds=delay))
        self.status.last_progress_time = None  # the next attempt's clock starts when it runs
        self.plan.delete_stage = True
        self.condition(cond.RUNNING, False, reason, why)

    def complete_stage(self, record: StageStatus) -> None:
        progress = self.seen.progress
        final = progress.final_checkpoint if progress and progress.stage == record.name else None
        if final is None:
            for pod in self.seen.trainer_pods:
                message = podstate.termination_message(pod, "trainer")
                if message.startswith("{"):
                    final = Progress.model_validate_json(message).final_checkpoint
        if final is None:
            self.restart(self.context(), "the trainer exited 0 without a final checkpoint")
            return
        prefix = f"{self.context().checkpoint_uri}/"
        if not _strictly_under(final, prefix):
            # The report comes from the tenant's pod; the operator reads S3 to confirm it, so
            # it never looks outside the place this stage writes to.
            record.phase = "Failed"
            self.finish(
                False,
                "CheckpointOutsideStorage",
                f"stage {record.name}: the trainer reported final checkpoint {final!r}, "
                f"which is not under this stage's checkpoint prefix {prefix!r} "
                "(spec.storage.uri/<namespace>/<run>/<uid>/<stage>/)",
            )
            return
        if self.seen.final_checkpoint_error:
            # The stage's work is done and kept; only the confirmation waits for S3.
            message = (
                f"stage {record.name}: cannot confirm final checkpoint {final} in S3 yet "
                f"(checked again every {RETRY_AFTER_S:.0f}s): {self.seen.final_checkpoint_error}"
            )
            if not cond.is_true(self.status.conditions, cond.BLOCKED):
                self.event("CheckpointUnverified", message, "Warning")
            self.condition(cond.BLOCKED, True, "CheckpointUnverified", message)
            self.plan.check_final_checkpoint = final
            return
        if self.seen.final_checkpoint_committed is None:
            self.plan.check_final_checkpoint = final
            return
        if not self.seen.final_checkpoint_committed:
            self.restart(self.context(), f"final checkpoint {final} has no manifest in S3")
            return
        if cond.is_true(self.status.conditions, cond.BLOCKED):
            self.condition(cond.BLOCKED, False, "CheckpointVerified", f"final checkpoint {final}")
        record.phase, record.completion_time, record.final_checkpoint = (
            "Succeeded",
            self.now,
            final,
        )
        self.status.last_checkpoint = final
        self.plan.delete_stage = True
        self.event(
            "StageSucceeded",
            f"stage {record.name} finished at step {record.step}; final checkpoint {final}",
        )
        if self.index + 1 == len(self.spec.stages):
            self.finish(
                True,
                "Succeeded",
                f"all {len(self.spec.stages)} stages finished; final checkpoint {final}",
            )
            return
        self.status.stage_index = self.index + 1
        self.status.stage = self.spec.stages[self.index].name
        self.status.step = self.status.total_steps = None
        self.status.last_progress_time = None
        self.status.progress = self.status.reward = self.status.accuracy = None
        self.status.eval_accuracy = self.status.eval_gain = None
        self.record()

    def next_due(self) -> float | None:
        """Seconds until the earliest moment at which this run's decision changes with no
        event from the cluster; None when nothing is timed."""
        status, now = self.status, self.seen.now
        due: list[dt.datetime] = []
        finished = _parse(status.completion_time)
        if status.phase in ("Succeeded", "Failed"):
            ttl = self.spec.ttl_seconds_after_finished
            if ttl is not None and finished is not None:
                due.append(finished + dt.timedelta(seconds=ttl))
        else:
            retry_after = _parse(status.retry_after)
            if retry_after is not None:
                due.append(retry_after)
            deadline, active = self.spec.active_deadline_seconds, self.active_seconds()
            if deadline and active is not None and status.suspended_since is None:
                due.append(now + dt.timedelta(seconds=deadline - active))
            last = _parse(status.last_progress_time)
            timeout = stall_timeout(self.spec, self.index)
            if last is not None and timeout and status.phase == "Running":
                due.append(last + dt.timedelta(seconds=timeout))
        if not due:
            return None
        # Past the moment by a second: the status's timestamps have whole seconds, and
        # the checks fire once strictly past their limit.
        return max(0.0, (min(due) - now).total_seconds()) + 1.0

    def done(self) -> Plan:
        self.plan.recheck_after = self.next_due()
        # Unset top-level fields go as null so a merge patch clears them.
        status = self.status.model_dump(by_alias=True, mode="json")
        status["stages"] = [stage.wire() for stage in self.status.stages]
        status["conditions"] = [c.wire() for c in self.status.conditions]
        self.plan.status = status
        return self.plan


def _strictly_under(uri: str, prefix: str) -> bool:
    """`uri` names something below `prefix` (a folder URI ending in "/"), with no `.` or `..`
    segment that could lead out of it."""
    if not uri.startswith(prefix):
        return False
    rest = uri[len(prefix) :].split("/")
    return all(part not in ("", ".", "..") for part in rest)


def decide(seen: Observed, settings: OperatorSettings) -> Plan:
    """The plan for one run, given what the operator observed."""
    return _Decision(seen, settings).decide()
