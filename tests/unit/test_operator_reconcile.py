"""The run's state machine, scenario by scenario, with no cluster: what the operator saw in,
what it does out."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from typing import Any

import yaml
from tests.invalid_runs import valid_run

from lmmr1_operator.reconcile import CreateFailure, Observed, Plan, decide
from lmmr1_operator.settings import OperatorSettings
from lmmr1_trainer.config import EXIT_CONFIG_ERROR, Progress

SETTINGS = OperatorSettings(restart_backoff_seconds=10)
NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def new_run(rollout_mode: str | None = None, **spec: Any) -> dict[str, Any]:
    run = valid_run("r")
    run["metadata"].update(namespace="ns", uid="uid-1", generation=1)
    run["spec"].update(spec)
    if rollout_mode is not None:
        for stage in run["spec"]["stages"]:
            stage.setdefault("resources", {}).setdefault("rollout", {})["mode"] = rollout_mode
    return run


def with_status(run: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The run as the API server returns it after the plan's status patch."""
    status = {k: v for k, v in plan.status.items() if v is not None}
    return {**run, "status": status}


def seen(run: dict[str, Any], **kwargs: Any) -> Observed:
    return Observed(
        run=run, now=kwargs.pop("now", NOW), token="tok", service_account="default", **kwargs
    )


def pod(
    name: str,
    phase: str = "Running",
    ready: bool = True,
    ip: str = "10.0.0.1",
    exit_code: int | None = None,
    message: str = "",
    container: str = "rollout",
    waiting: str | None = None,
    unschedulable: bool = False,
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": phase,
        "podIP": ip,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if exit_code is not None:
        status["containerStatuses"] = [
            {
                "name": container,
                "state": {"terminated": {"exitCode": exit_code, "message": message}},
            }
        ]
    if waiting:
        status["containerStatuses"] = [
            {"name": container, "image": "img:1", "state": {"waiting": {"reason": waiting}}}
        ]
    if unschedulable:
        status["conditions"].append(
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/5 nodes: Insufficient nvidia.com/gpu",
            }
        )
    # Rollout pods say which replica they serve (the operator matches them by it).
    replica = {"lmmr1.io/replica": name.rsplit("-", 1)[1]} if container == "rollout" else {}
    return {"metadata": {"name": name, "annotations": replica}, "status": status}


def job(complete: bool = False, failed: bool = False) -> dict[str, Any]:
    conditions = []
    if complete:
        conditions.append({"type": "Complete", "status": "True"})
    if failed:
        conditions.append({"type": "Failed", "status": "True"})
    return {"metadata": {"name": "r-fre-t0", "uid": "j"}, "status": {"conditions": conditions}}


def finished_report(final: str, stage: str = "fre") -> Progress:
    """The trainer's last progress report: its stage done at step 40 with `final`."""
    return Progress(
        stage=stage,
        step=40,
        total_steps=40,
        final_checkpoint=final,
        updated_at="2026-01-01T12:00:00Z",
    )


def kinds(objs: list[dict[str, Any]]) -> list[str]:
    return [f"{o['kind']}/{o['metadata']['name']}" for o in objs]


def conditions(plan: Plan) -> dict[str, str]:
    return {c["type"]: c["status"] for c in plan.status["conditions"]}


def started(rollout_mode: str | None = None) -> tuple[dict[str, Any], Plan]:
    """A run after its first pass (one trainer node: colocated rollouts unless told)."""
    run = new_run(rollout_mode)
    plan = decide(seen(run), SETTINGS)
    return with_status(run, plan), plan


def stage_yaml(plan: Plan) -> dict[str, Any]:
    config = next(o for o in plan.replace if o["kind"] == "ConfigMap")
    loaded: dict[str, Any] = yaml.safe_load(config["data"]["stage.yaml"])
    return loaded


def test_a_colocated_stage_starts_its_trainer_at_once_with_no_rollout_servers() -> None:
    _, plan = started()
    created = kinds(plan.ensure)
    assert not [k for k in created if "rollout" in k and k != "Secret/r-rollout-token"], created
    assert "Job/r-fre-t0" in created and "Service/r-fre-trainer" in created
    # One NetworkPolicy (the trainer's), created before the Job's pods can exist.
    policies = [k for k in created if k.startswith("NetworkPolicy/")]
    assert policies == ["NetworkPolicy/r-fre-trainer"]
    assert created.index(policies[0]) < created.index("Job/r-fre-t0")
    assert kinds(plan.replace) == ["ConfigMap/r-fre-config"]
    assert set(plan.replace[0]["data"]) == {"stage.yaml"}
    rollout = stage_yaml(plan)["rollout"]
    assert (rollout["mode"], rollout["urls"], rollout["backend"]) == ("colocate", [], "vllm")
    assert plan.status["stages"][0]["rolloutMode"] == "colocate"
    # Nothing else to wait for: the same plan on the next pass, with the config in place.
    run = with_status(new_run(), plan)
    again = decide(seen(run, config=plan.replace[0]), SETTINGS)
    assert "Job/r-fre-t0" in kinds(again.ensure) and not again.replace


def test_a_multi_node_trainer_defaults_to_rollout_servers_started_first() -> None:
    run = new_run()
    for stage in run["spec"]["stages"]:
        stage["resources"] = {"trainer": {"nodes": 2}}
    plan = decide(seen(run), SETTINGS)
    created = kinds(plan.ensure)
    assert "Pod/r-fre-r0-0" in created and "Service/r-fre-rollout" in created
    assert "NetworkPolicy/r-fre-rollout" in created
    assert not any(o["kind"] == "Job" for o in plan.ensure)
    assert set(plan.replace[0]["data"]) == {"rollout.yaml"}
    assert plan.status["stages"][0]["rolloutMode"] == "separate"


def test_a_new_run_in_separate_mode_starts_its_rollout_servers_first() -> None:
    _, plan = started("separate")
    assert plan.status["phase"] == "Pending"
    assert plan.status["stage"] == "fre" and plan.status["stageIndex"] == 0
    assert "Pod/r-fre-r0-0" in kinds(plan.ensure)
    assert "Secret/r-rollout-token" in kinds(plan.ensure)
    assert "Role/r-progress" in kinds(plan.ensure)
    assert not any(o["kind"] == "Job" for o in plan.ensure)  # rollouts are not ready yet
    created = kinds(plan.ensure)
    assert created.index("NetworkPolicy/r-fre-rollout") < created.index("Pod/r-fre-r0-0")
    assert "NetworkPolicy/r-fre-trainer" in created
    assert kinds(plan.replace) == ["ConfigMap/r-fre-config"]
    assert set(plan.replace[0]["data"]) == {"rollout.yaml"}
    assert plan.status["stages"][0]["rolloutMode"] == "separate"
    assert [e[1] for e in plan.events] == ["Created", "StageStarted"]


def test_deciding_twice_on_the_same_world_changes_nothing() -> None:
    run, plan = started()
    again = decide(seen(run), SETTINGS)
    assert again.status == plan.status  # conditions included
    assert again.events == [] and kinds(again.ensure) == kinds(plan.ensure)
    # Later, in the same world: no condition moves its lastTransitionTime.
    later = decide(seen(run, now=NOW + dt.timedelta(minutes=5)), SETTINGS)
    assert later.status["conditions"] == plan.status["conditions"]
    assert {c["lastTransitionTime"] for c in later.status["conditions"]} == {"2026-01-01T12:00:00Z"}


def test_ready_rollouts_give_the_trainer_its_config_and_job() -> None:
    run, _ = started("separate")
    config = {"data": {"rollout.yaml": "x"}}
    plan = decide(
        seen(run, rollout_pods=[pod("r-fre-r0-0", ip="10.0.0.7")], config=config), SETTINGS
    )
    assert "Job/r-fre-t0" in kinds(plan.ensure)
    rollout = stage_yaml(plan)["rollout"]
    assert (rollout["mode"], rollout["urls"]) == ("separate", ["http://10.0.0.7:8000"])


def test_progress_reaches_the_status() -> None:
    run, _ = started()
    progress = Progress(
        stage="fre",
        step=12,
        total_steps=40,
        reward=0.75,
        accuracy=0.5,
        last_checkpoint="s3://b/c/step-10",
        initial_reward=0.1,
        rollout_engine="vllm 0.32.0 cpu, colocate",
        skipped_rows=3,
        updated_at="2026-01-01T12:00:00Z",
    )
    plan = decide(
        seen(run, progress=progress, trainer_pods=[pod("t", container="trainer")]), SETTINGS
    )
    status = plan.status
    assert (status["phase"], status["step"], status["totalSteps"], status["progress"]) == (
        "Running",
        12,
        40,
        "30%",
    )
    assert status["reward"] == 0.75 and status["lastCheckpoint"] == "s3://b/c/step-10"
    assert status["stages"][0]["initialReward"] == 0.1
    assert status["stages"][0]["rolloutEngine"] == "vllm 0.32.0 cpu, colocate"
    assert status["stages"][0]["skippedRows"] == 3  # dataset rows the pre-flight left out
    assert conditions(plan)["Running"] == "True"


def test_a_finished_stage_is_verified_in_s3_then_the_next_stage_starts_from_it() -> None:
    run, _ = started()
    final = "s3://bucket/ckpt/ns/r/uid-1/fre/step-40"
    progress = finished_report(final)
    world = seen(run, job=job(complete=True), progress=progress, stage_children_exist=True)
    plan = decide(world, SETTINGS)
    assert plan.check_final_checkpoint == final and plan.status["stageIndex"] == 0
    plan = decide(replace(world, final_checkpoint_committed=True), SETTINGS)
    assert plan.delete_stage
    assert plan.status["stageIndex"] == 1 and plan.status["stage"] == "mgt"
    assert plan.status["stages"][0]["finalCheckpoint"] == final
    assert "StageSucceeded" in [e[1] for e in plan.events]
    nxt = decide(seen(with_status(run, plan)), SETTINGS)
    config = next(o for o in nxt.replace if o["kind"] == "ConfigMap")
    assert f"init_from: {final}" in config["data"]["stage.yaml"]
    assert nxt.status["stages"][1]["initCheckpoint"] == final


def test_the_last_stage_finishing_succeeds_the_run() -> None:
    run, _ = started()
    run["status"].update(
        stageIndex=1,
        stage="mgt",
        stages=[
            {
                "name": "fre",
                "phase": "Succeeded",
                "finalCheckpoint": "s3://b/fre/step-4",
                "restarts": 0,
            },
            {"name": "mgt", "phase": "Running", "restarts": 0},
        ],
    )
    progress = Progress(
        stage="mgt",
        step=4,
        total_steps=4,
        final_checkpoint="s3://bucket/ckpt/ns/r/uid-1/mgt/step-4",
        updated_at="2026-01-01T12:00:00Z",
    )
    plan = decide(
        seen(run, job=job(complete=True), progress=progress, final_checkpoint_committed=True),
        SETTINGS,
    )
    assert plan.status["phase"] == "Succeeded"
    assert (
        conditions(plan).items()
        >= {"Complete": "True", "Failed": "False", "Running": "False"}.items()
    )
    assert plan.delete_stage


def test_a_completed_trainer_without_a_committed_checkpoint_restarts() -> None:
    run, _ = started()
    progress = finished_report("s3://bucket/ckpt/ns/r/uid-1/fre/step-40")
    plan = decide(
        seen(run, job=job(complete=True), progress=progress, final_checkpoint_committed=False),
        SETTINGS,
    )
    assert plan.status["restarts"] == 1 and plan.delete_stage


def test_a_failed_pod_restarts_the_stage_with_backoff_until_the_limit() -> None:
    run, _ = started("separate")
    failed = seen(run, rollout_pods=[pod("r-fre-r0-0", phase="Failed", exit_code=137)])
    plan = decide(failed, SETTINGS)
    assert plan.delete_stage and plan.status["restarts"] == 1
    assert plan.status["retryAfter"] == "2026-01-01T12:00:10Z"
    assert plan.events[-1][:2] == ("Warning", "StageRestarting")
    run = with_status(run, plan)
    # Waiting out the back-off: nothing is created.
    waiting = decide(seen(run, now=NOW + dt.timedelta(seconds=5)), SETTINGS)
    assert not waiting.ensure and not waiting.delete_stage
    # After it, the stage comes back.
    later = decide(seen(run, now=NOW + dt.timedelta(seconds=11)), SETTINGS)
    assert "Pod/r-fre-r1-0" in kinds(later.ensure)
    # The fourth failure exceeds backoffLimit=3 (the doubling: the test below).
    run["status"]["restarts"] = 3
    run["status"]["retryAfter"] = None
    final = decide(replace(failed, run=run), SETTINGS)
    assert final.status["phase"] == "Failed"
    assert conditions(final)["Failed"] == "True"
    assert "BackoffLimitExceeded" in [c["reason"] for c in final.status["conditions"]]


def test_the_restart_backoff_doubles_from_the_setting_and_caps_at_five_minutes() -> None:
    run, _ = started("separate")
    run["spec"]["backoffLimit"] = 8
    now, waits = NOW, []
    for restart in range(1, 9):
        failed = [pod(f"r-fre-r{restart - 1}-0", phase="Failed", exit_code=137)]
        plan = decide(seen(run, now=now, rollout_pods=failed), SETTINGS)
        assert plan.delete_stage and plan.status["restarts"] == restart
        retry_after = dt.datetime.fromisoformat(plan.status["retryAfter"].replace("Z", "+00:00"))
        waits.append((retry_after - now).total_seconds())
        assert f"restart {restart}/8 in {waits[-1]:.0f}s" in plan.events[-1][2]
        run = with_status(run, plan)
        # Nothing comes back a second early; the stage is recreated once the wait is over.
        early = decide(seen(run, now=retry_after - dt.timedelta(seconds=1)), SETTINGS)
        assert not early.ensure
        now = retry_after + dt.timedelta(seconds=1)
        back = decide(seen(run, now=now), SETTINGS)
        assert f"Pod/r-fre-r{restart}-0" in kinds(back.ensure)
        run = with_status(run, back)
    # restart_backoff_seconds=10: 10 s, doubling, capped at 300 s.
    assert waits == [10, 20, 40, 80, 160, 300, 300, 300]
    failed = [pod("r-fre-r8-0", phase="Failed", exit_code=137)]
    assert decide(seen(run, now=now, rollout_pods=failed), SETTINGS).status["phase"] == "Failed"


def test_a_config_error_fails_fast_without_retrying() -> None:
    run, _ = started()
    trainer = pod(
        "r-fre-t0-0",
        phase="Failed",
        container="trainer",
        exit_code=EXIT_CONFIG_ERROR,
        message="dataset.uri: no such object",
    )
    plan = decide(seen(run, trainer_pods=[trainer], job=job(failed=True)), SETTINGS)
    assert plan.status["phase"] == "Failed" and plan.status.get("restarts") == 0
    message = next(c["message"] for c in plan.status["conditions"] if c["type"] == "Failed")
    assert "dataset.uri: no such object" in message and "retrying cannot help" in message


def test_suspend_stops_the_pods_and_resume_continues() -> None:
    run, _ = started("separate")
    run["spec"]["suspend"] = True
    plan = decide(seen(run, stage_children_exist=True), SETTINGS)
    assert plan.status["phase"] == "Suspended" and plan.delete_stage
    assert conditions(plan)["Suspended"] == "True"
    run = with_status(run, plan)
    run["spec"]["suspend"] = False
    plan = decide(seen(run), SETTINGS)
    assert plan.status["phase"] == "Pending" and conditions(plan)["Suspended"] == "False"
    assert "Pod/r-fre-r0-0" in kinds(plan.ensure)
    assert "Resumed" in [e[1] for e in plan.events]


def test_active_deadline_and_ttl_behave_as_in_batch_jobs() -> None:
    run, _ = started()
    run["spec"]["activeDeadlineSeconds"] = 60
    run["spec"]["ttlSecondsAfterFinished"] = 30
    plan = decide(seen(run, now=NOW + dt.timedelta(seconds=61)), SETTINGS)
    assert plan.status["phase"] == "Failed" and plan.delete_stage
    assert "DeadlineExceeded" in [c["reason"] for c in plan.status["conditions"]]
    run = with_status(run, plan)
    assert not decide(seen(run, now=NOW + dt.timedelta(seconds=70)), SETTINGS).delete_run
    assert decide(seen(run, now=NOW + dt.timedelta(seconds=92)), SETTINGS).delete_run


def test_a_missing_secret_blocks_with_a_condition_saying_what_to_do() -> None:
    run = new_run()
    plan = decide(seen(run, credentials_missing="s3-creds"), SETTINGS)
    blocked = next(c for c in plan.status["conditions"] if c["type"] == "Blocked")
    assert blocked["status"] == "True" and blocked["reason"] == "SecretNotFound"
    assert "'s3-creds'" in blocked["message"] and "AWS_ACCESS_KEY_ID" in blocked["message"]
    assert not plan.ensure


def test_unschedulable_and_bad_images_show_as_conditions() -> None:
    run, _ = started("separate")
    plan = decide(
        seen(
            run,
            rollout_pods=[pod("r-fre-r0-0", phase="Pending", ready=False, unschedulable=True)],
        ),
        SETTINGS,
    )
    blocked = next(c for c in plan.status["conditions"] if c["type"] == "Blocked")
    assert blocked["reason"] == "Unschedulable" and "nvidia.com/gpu" in blocked["message"]
    plan = decide(
        seen(
            run,
            rollout_pods=[
                pod("r-fre-r0-0", phase="Pending", ready=False, waiting="ImagePullBackOff")
            ],
        ),
        SETTINGS,
    )
    blocked = next(c for c in plan.status["conditions"] if c["type"] == "Blocked")
    assert blocked["reason"] == "ImagePullError"


def test_status_is_json_serialisable_and_carries_the_generation() -> None:
    _, plan = started()
    assert json.loads(json.dumps(plan.status))["observedGeneration"] == 1


def test_set_condition_moves_the_transition_time_only_when_the_status_flips() -> None:
    from lmmr1_operator.conditions import set_condition

    t0, t1, t2 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z"
    conditions = set_condition([], "Ready", False, "Starting", "pods", t0, 1)
    conditions = set_condition(conditions, "Failed", False, "NoFailure", "", t0, 1)
    same = set_condition(conditions, "Ready", False, "Waiting", "rollout", t1, 2)
    assert [c.type for c in same] == ["Ready", "Failed"]  # order kept, no duplicate
    assert same[0].last_transition_time == t0 and same[0].reason == "Waiting"
    assert same[0].observed_generation == 2 and same[1] == conditions[1]
    flipped = set_condition(same, "Ready", True, "Running", "", t2, 2)
    assert flipped[0].status == "True" and flipped[0].last_transition_time == t2


def _trainer_pod_with_sidecar(verifier: dict[str, Any], phase: str = "Pending") -> dict[str, Any]:
    return {
        "metadata": {"name": "r-fre-t0-0-x"},
        "status": {
            "phase": phase,
            "podIP": "10.0.0.2",
            "conditions": [{"type": "Ready", "status": "False"}],
            "initContainerStatuses": [{"name": "verifier", "restartCount": 1, **verifier}],
            "containerStatuses": [
                {"name": "trainer", "state": {"waiting": {"reason": "PodInitializing"}}}
            ],
        },
    }


def _failed_condition(plan: Plan) -> dict[str, Any]:
    return next(c for c in plan.status["conditions"] if c["type"] == "Failed")


def test_a_rollout_servers_config_error_fails_fast_without_retrying() -> None:
    run, _ = started("separate")
    server = pod(
        "r-fre-r0-0",
        phase="Failed",
        ready=False,
        exit_code=EXIT_CONFIG_ERROR,
        message="rollout config: rollout.backend: vllm needs a GPU",
    )
    plan = decide(seen(run, rollout_pods=[server]), SETTINGS)
    assert plan.status["phase"] == "Failed" and plan.status.get("restarts") == 0
    failed = _failed_condition(plan)
    assert failed["reason"] == "ConfigError" and "vllm needs a GPU" in failed["message"]
    assert "container rollout of pod r-fre-r0-0" in failed["message"]
    assert plan.status["stages"][0]["phase"] == "Failed"


def test_a_verifier_sidecars_config_error_fails_the_run_though_its_pod_never_fails() -> None:
    """The kubelet restarts a native sidecar whatever its exit code: the pod stays Pending
    with the sidecar in CrashLoopBackOff, the exit 78 only in its lastState."""
    run, _ = started()
    crash_looping = _trainer_pod_with_sidecar(
        {
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {
                "terminated": {
                    "exitCode": EXIT_CONFIG_ERROR,
                    "message": "verifier: unknown verifier task 'geometry'",
                }
            },
        }
    )
    plan = decide(seen(run, trainer_pods=[crash_looping], job=job()), SETTINGS)
    assert plan.status["phase"] == "Failed" and plan.status.get("restarts") == 0
    failed = _failed_condition(plan)
    assert "container verifier" in failed["message"] and "'geometry'" in failed["message"]
    assert plan.delete_stage
    # The moment it exited, before the restart, reads the same.
    just_exited = _trainer_pod_with_sidecar(
        {"state": {"terminated": {"exitCode": EXIT_CONFIG_ERROR, "message": "bad flag"}}}
    )
    plan = decide(seen(run, trainer_pods=[just_exited], job=job()), SETTINGS)
    assert plan.status["phase"] == "Failed" and "bad flag" in _failed_condition(plan)["message"]


def test_a_sidecar_restarting_for_another_reason_is_left_to_the_kubelet() -> None:
    run, _ = started()
    crashed = _trainer_pod_with_sidecar(
        {
            "state": {"running": {}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
        },
        phase="Running",
    )
    plan = decide(seen(run, trainer_pods=[crashed], job=job()), SETTINGS)
    assert plan.status["phase"] == "Running" and not plan.delete_stage


def test_a_failed_pod_names_each_failed_container_and_its_exit_code() -> None:
    run, _ = started("separate")
    plan = decide(
        seen(run, rollout_pods=[pod("r-fre-r0-0", phase="Failed", exit_code=137)]),
        SETTINGS,
    )
    assert "r-fre-r0-0 (rollout exit 137) failed" in plan.events[-1][2]


def test_a_failed_trainer_says_why_on_the_run() -> None:
    """The trainer's termination message (a missed deadline, say) reaches the Event and
    the condition, cut to a readable length."""
    run, _ = started("separate")
    why = "WeightSyncTimeout: pushing weights v3 to 2 rollout server(s) did not finish within 600 s"
    failed = pod("r-fre-t0-0", phase="Failed", exit_code=1, message=why, container="trainer")
    plan = decide(seen(run, trainer_pods=[failed]), SETTINGS)
    assert f"r-fre-t0-0 (trainer exit 1: {why}) failed" in plan.events[-1][2]
    running = next(c for c in plan.status["conditions"] if c["type"] == "Running")
    assert (running["reason"], why in running["message"]) == ("StageRestarting", True)
    long = pod("r-fre-t0-0", phase="Failed", exit_code=1, message="x" * 5000, container="trainer")
    event = decide(seen(run, trainer_pods=[long]), SETTINGS).events[-1][2]
    assert "x" * 297 + "..." in event and "x" * 298 not in event


def refused_pod(message: str = "violates PodSecurity") -> CreateFailure:
    return CreateFailure("Pod", "r-fre-r0-0", "Forbidden", f'pods "r-fre-r0-0" {message}')


def test_a_refused_child_shows_as_a_condition_and_one_warning_event() -> None:
    run, _ = started()
    plan = decide(seen(run, create_failures=[refused_pod()]), SETTINGS)
    created = next(c for c in plan.status["conditions"] if c["type"] == "ChildrenCreated")
    assert (created["status"], created["reason"]) == ("False", "CreateFailed")
    assert created["message"] == 'Pod r-fre-r0-0: pods "r-fre-r0-0" violates PodSecurity'
    assert conditions(plan)["Blocked"] == "True"
    assert [e[:2] for e in plan.events] == [("Warning", "CreateFailed")]
    assert "r-fre-r0-0" in plan.events[0][2] and "PodSecurity" in plan.events[0][2]
    assert plan.status["phase"] == "Pending"  # the operator keeps trying: a fix may follow
    # Refused again on the next pass: the same condition, no second Event.
    run = with_status(run, plan)
    again = decide(seen(run, create_failures=[refused_pod("exceeded quota")]), SETTINGS)
    assert again.events == [] and conditions(again)["ChildrenCreated"] == "False"
    # Another child refused as well: a new Event.
    job_refused = CreateFailure("Job", "r-fre-t0", "FailedCreate", "Error creating: x")
    more = decide(seen(run, create_failures=[refused_pod(), job_refused]), SETTINGS)
    assert [e[1] for e in more.events] == ["CreateFailed"] and "Job r-fre-t0" in (more.events[0][2])
    # Once created, the condition turns True and the run is no longer blocked.
    healed = decide(seen(run), SETTINGS)
    created = next(c for c in healed.status["conditions"] if c["type"] == "ChildrenCreated")
    assert (created["status"], created["reason"]) == ("True", "Created")
    assert conditions(healed)["Blocked"] == "False"


def test_a_run_whose_children_were_all_accepted_has_no_children_created_condition() -> None:
    _, plan = started()
    assert "ChildrenCreated" not in conditions(plan)


def _event(message: str, at: str) -> dict[str, Any]:
    return {"reason": "FailedCreate", "message": message, "lastTimestamp": at}


def test_a_jobs_failed_create_events_say_why_it_has_no_pods() -> None:
    from lmmr1_operator.podstate import job_create_failure

    trainer_job = {**job(), "spec": {"parallelism": 2}}
    events = [
        _event("Error creating: old", "2026-01-01T12:00:00Z"),
        _event(
            'Error creating: pods "x" is forbidden: violates PodSecurity', "2026-01-01T12:01:00Z"
        ),
        {
            "reason": "SuccessfulCreate",
            "message": "Created pod",
            "lastTimestamp": "2026-01-01T12:02:00Z",
        },
    ]
    assert "violates PodSecurity" in (job_create_failure(trainer_job, [], events) or "")
    one = [pod("r-fre-t0-0", container="trainer")]
    assert "violates PodSecurity" in (job_create_failure(trainer_job, one, events) or "")
    assert job_create_failure(trainer_job, one * 2, events) is None  # every pod exists
    assert job_create_failure(trainer_job, [], events[2:]) is None


def test_a_refusal_keeps_the_api_servers_message_and_ignores_what_retrying_fixes() -> None:
    from kubernetes.client.exceptions import ApiException

    from lmmr1_operator.kube import refusal

    def error(status: int, body: dict[str, Any] | str) -> ApiException:
        err = ApiException(status=status, reason="Forbidden")
        err.body = body if isinstance(body, str) else json.dumps(body)
        return err

    obj = {"kind": "Pod", "metadata": {"name": "r-fre-r0-0", "namespace": "ns"}}
    message = 'pods "r-fre-r0-0" is forbidden: violates PodSecurity "restricted:latest"'
    refused = refusal(
        obj, error(403, {"kind": "Status", "reason": "Forbidden", "message": message})
    )
    assert refused is not None
    assert (refused.kind, refused.name, refused.reason, refused.message) == (
        "Pod",
        "r-fre-r0-0",
        "Forbidden",
        message,
    )
    assert refusal(obj, error(422, "not json")).message == "not json"  # type: ignore[union-attr]
    for status in (409, 429, 500, 503):
        assert refusal(obj, error(status, {"message": "later"})) is None


# -- the stall watchdog (issue 13) --------------------------------------------------------

CHECKPOINT = "s3://bucket/ckpt/ns/r/uid-1/fre/step-20"


def trainer_pods(*phases: str) -> list[dict[str, Any]]:
    return [
        pod(f"r-fre-t0-{i}", phase=phase, ready=phase == "Running", container="trainer")
        for i, phase in enumerate(phases)
    ]


def report(step: int, at: str, checkpoint: str | None = None) -> Progress:
    return Progress(
        stage="fre", step=step, total_steps=100, last_checkpoint=checkpoint, updated_at=at
    )


def at(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


def running_stage(**spec: Any) -> dict[str, Any]:
    """A run whose trainer pod was first seen Running at NOW: the stall clock started."""
    run = with_status(new_run(**spec), decide(seen(new_run(**spec)), SETTINGS))
    servers = [pod("r-fre-r0-0")] if spec.get("rollout_mode") == "separate" else []
    world = seen(run, job=job(), trainer_pods=trainer_pods("Running"), rollout_pods=servers)
    plan = decide(world, SETTINGS)
    assert plan.status["lastProgressTime"] == "2026-01-01T12:00:00Z"
    return with_status(run, plan)


def test_a_trainer_that_reports_nothing_stalls_just_past_its_timeout_not_before() -> None:
    run = running_stage(stallTimeoutSeconds=600)
    world = seen(run, job=job(), trainer_pods=trainer_pods("Running"))
    quiet = decide(replace(world, now=at(600)), SETTINGS)
    assert not quiet.delete_stage and quiet.status.get("restarts") == 0
    assert quiet.status["lastProgressTime"] == "2026-01-01T12:00:00Z"  # not moved by a pass
    stalled = decide(replace(world, now=at(601)), SETTINGS)
    assert stalled.delete_stage and stalled.status["restarts"] == 1
    assert stalled.status["retryAfter"] == "2026-01-01T12:10:11Z"  # the failed pod's back-off
    assert stalled.status["lastProgressTime"] is None  # the next attempt's clock is its own
    (event,) = stalled.events
    assert event[:2] == ("Warning", "Stalled")
    assert "no progress for 601s (stallTimeoutSeconds=600)" in event[2]
    assert "since 2026-01-01T12:00:00Z, before its first step" in event[2]
    assert "restart 1/3" in event[2]
    running = next(c for c in stalled.status["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("False", "Stalled")
    assert "stallTimeoutSeconds=600" in running["message"]


def test_each_new_progress_report_restarts_the_stall_clock() -> None:
    run = running_stage(stallTimeoutSeconds=600)
    pods = trainer_pods("Running")
    first = report(1, "2026-01-01T12:08:00Z")
    plan = decide(seen(run, now=at(500), job=job(), trainer_pods=pods, progress=first), SETTINGS)
    assert plan.status["lastProgressTime"] == "2026-01-01T12:08:20Z"
    assert plan.status["lastReportTime"] == "2026-01-01T12:08:00Z"
    run = with_status(run, plan)
    # The same report read again is no news: the clock runs from its first sighting.
    same = seen(run, now=at(1100), job=job(), trainer_pods=pods, progress=first)
    assert not decide(same, SETTINGS).delete_stage
    stalled = decide(replace(same, now=at(1101)), SETTINGS)
    assert stalled.events[0][1] == "Stalled" and "last at step 1" in stalled.events[0][2]
    # A report of the same step with a new time (a heartbeat) is progress too.
    beat = report(1, "2026-01-01T12:18:00Z")
    plan = decide(replace(same, now=at(1100), progress=beat), SETTINGS)
    assert plan.status["lastProgressTime"] == "2026-01-01T12:18:20Z"
    later = replace(same, run=with_status(run, plan), now=at(1700), progress=beat)
    assert not decide(later, SETTINGS).events


def test_pods_that_wait_for_a_node_or_an_image_are_not_stalled() -> None:
    run = with_status(new_run(), decide(seen(new_run()), SETTINGS))
    pulling = [pod("r-fre-t0-0", phase="Pending", ready=False, waiting="ContainerCreating")]
    plan = decide(seen(run, now=at(86_400), job=job(), trainer_pods=pulling), SETTINGS)
    assert plan.status.get("lastProgressTime") is None and not plan.delete_stage
    # Two trainer nodes: the clock starts once both run, not when the first one does.
    two = new_run()
    two["spec"]["stages"][0]["resources"] = {"trainer": {"nodes": 2}}
    run = with_status(two, decide(seen(two), SETTINGS))
    half = seen(
        run,
        now=at(86_400),
        job=job(),
        trainer_pods=trainer_pods("Running", "Pending"),
        rollout_pods=[pod("r-fre-r0-0")],  # two nodes: separate rollout servers
    )
    plan = decide(half, SETTINGS)
    assert plan.status.get("lastProgressTime") is None and not plan.delete_stage
    both = decide(replace(half, trainer_pods=trainer_pods("Running", "Running")), SETTINGS)
    assert both.status["lastProgressTime"] == "2026-01-02T12:00:00Z"


def test_stalls_count_against_the_backoff_limit() -> None:
    run = running_stage(stallTimeoutSeconds=60, backoffLimit=1)
    run["status"]["restarts"] = 1
    run["status"]["stages"][0]["restarts"] = 1
    plan = decide(seen(run, now=at(61), job=job(), trainer_pods=trainer_pods("Running")), SETTINGS)
    assert plan.status["phase"] == "Failed" and plan.delete_stage
    failed = _failed_condition(plan)
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "trainer stalled: no progress for 61s" in failed["message"]


def test_a_stalled_stage_keeps_its_last_checkpoint_and_its_next_attempt_resumes_from_it() -> None:
    run = running_stage(stallTimeoutSeconds=600)
    pods = trainer_pods("Running")
    last = report(23, "2026-01-01T12:05:00Z", checkpoint=CHECKPOINT)
    plan = decide(seen(run, now=at(300), job=job(), trainer_pods=pods, progress=last), SETTINGS)
    run = with_status(run, plan)
    stalled = decide(seen(run, now=at(901), job=job(), trainer_pods=pods, progress=last), SETTINGS)
    assert stalled.status["lastCheckpoint"] == CHECKPOINT
    assert f"last at step 23; last checkpoint {CHECKPOINT}" in stalled.events[0][2]
    run = with_status(run, stalled)
    # After the back-off: the same stage config, whose checkpoint prefix holds the committed
    # step-20 (the trainer resumes from the newest manifest there), under attempt 1.
    back = decide(seen(run, now=at(920), progress=last), SETTINGS)
    config = stage_yaml(back)
    assert CHECKPOINT.startswith(config["checkpoint"]["uri"] + "/")
    assert back.status["lastCheckpoint"] == CHECKPOINT
    job_labels = next(o for o in back.ensure if o["kind"] == "Job")["metadata"]["labels"]
    assert job_labels["lmmr1.io/attempt"] == "1"
    # The last attempt's report, still in the ConfigMap, does not start the new clock: the
    # new trainer running does.
    run = with_status(run, back)
    new_pod = seen(run, now=at(1000), job=job(), trainer_pods=pods, progress=last)
    assert decide(new_pod, SETTINGS).status["lastProgressTime"] == "2026-01-01T12:16:40Z"


def test_a_stage_may_set_its_own_stall_timeout_and_zero_turns_the_watchdog_off() -> None:
    def stalls(run_timeout: int | None, stage_timeout: int | None, quiet: float) -> bool:
        spec = {} if run_timeout is None else {"stallTimeoutSeconds": run_timeout}
        run = running_stage(**spec)
        if stage_timeout is not None:
            run["spec"]["stages"][0]["stallTimeoutSeconds"] = stage_timeout
        world = seen(run, now=at(quiet), job=job(), trainer_pods=trainer_pods("Running"))
        return decide(world, SETTINGS).delete_stage

    assert not stalls(None, None, 1800) and stalls(None, None, 1801)  # the default: 30 min
    assert stalls(600, 60, 61) and not stalls(60, 600, 61)  # the stage's own wins
    assert not stalls(0, None, 86_400 * 7) and not stalls(60, 0, 86_400 * 7)
    assert stalls(0, 60, 61)


def test_a_final_checkpoint_outside_the_stages_prefix_fails_the_run_without_reading_s3() -> None:
    """The report comes from the tenant's pod and the operator confirms it in S3: it must
    never look outside `<storage.uri>/<namespace>/<run>/<uid>/<stage>/`."""
    for final in (
        "s3://other-tenant/ckpt/ns/r/uid-1/fre/step-40",
        "s3://bucket/ckpt/ns/r/fre/step-40",  # a path without the run's UID: another run's
        "s3://bucket/ckpt/ns/r/uid-1/fre/../../uid-0/fre/step-40",
        "s3://bucket/ckpt/ns/r/uid-1/fre/",
    ):
        run, _ = started()
        progress = finished_report(final)
        plan = decide(seen(run, job=job(complete=True), progress=progress), SETTINGS)
        assert plan.check_final_checkpoint is None, final
        assert plan.status["phase"] == "Failed", final
        failed = next(c for c in plan.status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "CheckpointOutsideStorage"
        assert "s3://bucket/ckpt/ns/r/uid-1/fre/" in failed["message"]


def test_checkpoints_of_a_run_created_again_under_the_same_name_go_elsewhere() -> None:
    again = new_run()
    again["metadata"]["uid"] = "uid-2"
    plan = decide(seen(again), SETTINGS)
    uris = (stage_yaml(started()[1])["checkpoint"]["uri"], stage_yaml(plan)["checkpoint"]["uri"])
    assert uris == ("s3://bucket/ckpt/ns/r/uid-1/fre", "s3://bucket/ckpt/ns/r/uid-2/fre")


def test_a_final_checkpoint_s3_cannot_confirm_blocks_with_its_error_then_goes_on() -> None:
    run, _ = started()
    progress = finished_report("s3://bucket/ckpt/ns/r/uid-1/fre/step-40")
    world = seen(
        run,
        job=job(complete=True),
        progress=progress,
        final_checkpoint_error="ConnectTimeoutError: Connect timeout on endpoint URL",
    )
    plan = decide(world, SETTINGS)
    blocked = next(c for c in plan.status["conditions"] if c["type"] == "Blocked")
    assert (blocked["status"], blocked["reason"]) == ("True", "CheckpointUnverified")
    assert "ConnectTimeoutError" in blocked["message"] and "step-40" in blocked["message"]
    assert [e[:2] for e in plan.events] == [("Warning", "CheckpointUnverified")]
    assert plan.check_final_checkpoint and plan.status["stageIndex"] == 0
    assert plan.status["restarts"] == 0 and not plan.delete_stage  # the stage's work is kept
    again = decide(replace(world, run=with_status(run, plan)), SETTINGS)
    assert not again.events  # one Warning, not one per pass
    verified = replace(
        world,
        run=with_status(run, plan),
        final_checkpoint_error=None,
        final_checkpoint_committed=True,
    )
    plan = decide(verified, SETTINGS)
    assert plan.status["stageIndex"] == 1
    blocked = next(c for c in plan.status["conditions"] if c["type"] == "Blocked")
    assert blocked["status"] == "False"


def test_an_error_in_the_operators_last_pass_shows_on_the_run_once_then_clears() -> None:
    run, _ = started()
    error = "ApiException: (500) Reason: Internal Server Error"
    plan = decide(seen(run, reconcile_error=error), SETTINGS)
    reconciled = next(c for c in plan.status["conditions"] if c["type"] == "Reconciled")
    assert (reconciled["status"], reconciled["reason"]) == ("False", "ReconcileError")
    assert error in reconciled["message"]
    assert ("Warning", "ReconcileError") in [e[:2] for e in plan.events]
    run = with_status(run, plan)
    again = decide(seen(run, reconcile_error=error), SETTINGS)
    assert "ReconcileError" not in [e[1] for e in again.events]  # one Event per error
    healed = decide(seen(with_status(run, again)), SETTINGS)
    assert conditions(healed)["Reconciled"] == "True"
    # A run that never failed a pass carries no such condition.
    assert "Reconciled" not in conditions(decide(seen(new_run()), SETTINGS))


# -- disruptions and the deadline's clock (issue 14) ---------------------------------------

DISRUPTION_REASONS = (
    "PreemptionByScheduler",
    "DeletionByTaintManager",
    "EvictionByEvictionAPI",
    "DeletionByPodGC",
    "TerminationByKubelet",
)


def disrupted(
    name: str = "r-fre-t0-0-abcde",
    reason: str = "PreemptionByScheduler",
    message: str = "Preempted by ns/urgent on node gpu-3",
    phase: str = "Failed",
    exit_code: int | None = 143,
    container: str = "trainer",
    terminating: bool = False,
) -> dict[str, Any]:
    """A pod Kubernetes ended: its DisruptionTarget condition, as the scheduler, the taint
    manager, the eviction API, the pod GC or the kubelet write it."""
    ended = pod(name, phase=phase, ready=False, exit_code=exit_code, container=container)
    ended["status"]["conditions"].append(
        {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": message}
    )
    if terminating:
        ended["metadata"]["deletionTimestamp"] = "2026-01-01T11:59:00Z"
    return ended


def failed_job(reason: str = "BackoffLimitExceeded", message: str = "") -> dict[str, Any]:
    failed = job(failed=True)
    failed["status"]["conditions"][0].update(reason=reason, message=message)
    return failed


def running_condition(plan: Plan) -> dict[str, Any]:
    return next(c for c in plan.status["conditions"] if c["type"] == "Running")


def test_a_disrupted_trainer_pod_restarts_the_stage_without_counting_a_restart() -> None:
    run = running_stage()
    world = seen(run, job=failed_job(), trainer_pods=[disrupted()], stage_children_exist=True)
    plan = decide(world, SETTINGS)
    assert plan.delete_stage and plan.status["phase"] == "Running"
    assert (plan.status["restarts"], plan.status.get("disruptions")) == (0, 1)
    record = plan.status["stages"][0]
    assert (record["restarts"], record["disruptions"]) == (0, 1)
    assert plan.status["retryAfter"] == "2026-01-01T12:00:10Z"  # the first back-off's wait
    running = running_condition(plan)
    assert (running["status"], running["reason"]) == ("False", "Disrupted")
    assert "r-fre-t0-0-abcde" in running["message"]
    ((kind, reason, message),) = plan.events
    assert (kind, reason) == ("Normal", "Disrupted")
    assert (
        "pod r-fre-t0-0-abcde ended by Kubernetes (PreemptionByScheduler: Preempted by "
        "ns/urgent on node gpu-3)" in message
    )
    assert "disruption 1, not counted against backoffLimit=3" in message
    # After the wait, the stage comes back under a new attempt (its old pods are stale).
    back = decide(seen(with_status(run, plan), now=at(11)), SETTINGS)
    job_labels = next(o for o in back.ensure if o["kind"] == "Job")["metadata"]["labels"]
    assert job_labels["lmmr1.io/attempt"] == "1"


def test_disruptions_beyond_the_backoff_limit_never_fail_the_run_but_failures_count() -> None:
    run = running_stage(backoffLimit=1, rollout_mode="separate")
    now = NOW
    ended = [disrupted(reason=reason) for reason in DISRUPTION_REASONS]
    ended.append(
        disrupted("r-fre-r0-0", "DeletionByTaintManager", "node lost", container="rollout")
    )
    for count, pod_ended in enumerate(ended, start=1):
        rollout_side = pod_ended["metadata"]["name"].startswith("r-fre-r0-")
        world = seen(
            run,
            now=now,
            job=job(),
            trainer_pods=[] if rollout_side else [pod_ended],
            rollout_pods=[pod_ended] if rollout_side else [pod("r-fre-r0-0")],
        )
        plan = decide(world, SETTINGS)
        assert plan.status["phase"] != "Failed", plan.status["conditions"]
        assert (plan.status["restarts"], plan.status.get("disruptions")) == (0, count)
        assert plan.events[-1][1] == "Disrupted"
        wait = dt.datetime.fromisoformat(plan.status["retryAfter"].replace("Z", "+00:00")) - now
        assert wait.total_seconds() == 10  # no doubling
        now += dt.timedelta(seconds=11)
        run = with_status(run, plan)
    # A plain failure after them still counts: the first restart, the first back-off.
    crashed = pod("r-fre-t0-0-abcde", phase="Failed", exit_code=1, container="trainer")
    servers = [pod("r-fre-r0-0")]
    world = seen(run, now=now, job=failed_job(), trainer_pods=[crashed], rollout_pods=servers)
    plan = decide(world, SETTINGS)
    assert (plan.status["restarts"], plan.status["disruptions"]) == (1, len(ended))
    assert (
        plan.events[-1][:2] == ("Warning", "StageRestarting")
        and "restart 1/1 in 10s" in (plan.events[-1][2])
    )
    run = with_status(run, plan)
    again = decide(seen(run, now=now + dt.timedelta(seconds=11), trainer_pods=[crashed]), SETTINGS)
    assert again.status["phase"] == "Failed"
    assert _failed_condition(again)["reason"] == "BackoffLimitExceeded"


def test_a_pod_on_its_way_out_for_a_disruption_restarts_the_stage_before_it_fails() -> None:
    """An eviction marks the pod, then deletes it: the stage restarts while the pod still
    terminates. A pod that only carries the condition (no deletion followed) still runs."""
    run = running_stage()
    evicted = disrupted(
        reason="EvictionByEvictionAPI",
        message="Eviction API: evicting",
        phase="Running",
        exit_code=None,
        terminating=True,
    )
    plan = decide(seen(run, job=job(), trainer_pods=[evicted]), SETTINGS)
    assert plan.delete_stage
    assert (plan.status["restarts"], plan.status.get("disruptions")) == (0, 1)
    marked = disrupted(phase="Running", exit_code=None)
    plan = decide(seen(run, job=job(), trainer_pods=[marked]), SETTINGS)
    assert not plan.delete_stage and plan.status.get("disruptions") is None


def test_a_trainer_job_failed_by_its_disruption_rule_counts_as_a_disruption() -> None:
    """The pod is gone (deleted once the Job controller counted it): the Job's condition,
    from its podFailurePolicy, says it was disrupted. Any other Job failure still counts."""
    run = running_stage()
    message = (
        "Pod ns/r-fre-t0-0-abcde has condition DisruptionTarget matching FailJob rule at index 0"
    )
    plan = decide(seen(run, job=failed_job("PodFailurePolicy", message)), SETTINGS)
    assert (plan.status["restarts"], plan.status.get("disruptions")) == (0, 1)
    assert plan.events[-1][1] == "Disrupted" and message in plan.events[-1][2]
    plan = decide(
        seen(
            run,
            job=failed_job("BackoffLimitExceeded", "Job has reached the specified backoff limit"),
        ),
        SETTINGS,
    )
    assert plan.status["restarts"] == 1 and plan.status.get("disruptions") is None


def test_a_config_error_on_a_disrupted_pod_still_fails_the_run_at_once() -> None:
    run = running_stage()
    rejected = disrupted(exit_code=EXIT_CONFIG_ERROR)
    rejected["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = "bad key"
    plan = decide(seen(run, job=failed_job(), trainer_pods=[rejected]), SETTINGS)
    assert plan.status["phase"] == "Failed" and _failed_condition(plan)["reason"] == "ConfigError"
    assert plan.status.get("disruptions") is None and plan.status["restarts"] == 0


def _suspend(run: dict[str, Any], suspend: bool, now: dt.datetime) -> dict[str, Any]:
    run["spec"]["suspend"] = suspend
    plan = decide(seen(run, now=now, stage_children_exist=True), SETTINGS)
    return with_status(run, plan)


def test_time_suspended_does_not_count_toward_the_active_deadline() -> None:
    hour = 3600
    run = running_stage(activeDeadlineSeconds=hour)
    run = _suspend(run, True, at(600))  # 10 min running, then suspended for 2 h
    assert run["status"]["phase"] == "Suspended"
    still = decide(seen(run, now=at(600 + 2 * hour)), SETTINGS)
    assert still.status["phase"] == "Suspended", _failed_condition(still)["message"]
    assert run["status"]["suspendedSince"] == "2026-01-01T12:10:00Z"
    run = _suspend(run, False, at(600 + 2 * hour))
    assert run["status"]["phase"] != "Failed" and run["status"]["suspendedSeconds"] == 2 * hour
    assert run["status"].get("suspendedSince") is None
    # 50 more minutes of running: an hour in all. One second more fails it.
    resumed = seen(run, now=at(2 * hour + hour), job=job(), trainer_pods=trainer_pods("Running"))
    plan = decide(resumed, SETTINGS)
    assert plan.status["phase"] == "Running" and not plan.delete_stage
    plan = decide(replace(resumed, now=at(2 * hour + hour + 1)), SETTINGS)
    assert plan.status["phase"] == "Failed" and plan.delete_stage
    failed = _failed_condition(plan)
    assert failed["reason"] == "DeadlineExceeded"
    assert "(3601s active, 7200s suspended not counted)" in failed["message"]


def test_each_suspension_adds_to_the_time_not_counted() -> None:
    run = running_stage(activeDeadlineSeconds=100)
    run = _suspend(run, True, at(50))
    run = _suspend(run, False, at(1050))
    run = _suspend(run, True, at(1080))
    run = _suspend(run, False, at(5080))
    assert run["status"]["suspendedSeconds"] == 5000
    assert decide(seen(run, now=at(5100)), SETTINGS).status["phase"] != "Failed"  # 100 s
    assert decide(seen(run, now=at(5101)), SETTINGS).status["phase"] == "Failed"


# -- timed decisions: when the operator must decide again with no event (issue 14) ---------


def test_each_timed_decision_asks_to_be_decided_again_just_past_its_moment() -> None:
    """The back-off's end, the stall watchdog, activeDeadlineSeconds and the TTL each fire
    with no event from the cluster: the plan says when, and deciding then acts."""
    # A back-off of 10 s from NOW.
    run, _ = started("separate")
    failed = seen(run, rollout_pods=[pod("r-fre-r0-0", phase="Failed", exit_code=137)])
    plan = decide(failed, SETTINGS)
    assert plan.recheck_after == 11.0
    backing_off = with_status(run, plan)
    assert decide(seen(backing_off, now=at(4)), SETTINGS).recheck_after == 7.0
    assert "Pod/r-fre-r1-0" in kinds(decide(seen(backing_off, now=at(11)), SETTINGS).ensure)
    # The stall clock started at NOW: decided again just past its timeout, which fires then.
    run = running_stage(stallTimeoutSeconds=600)
    world = seen(run, now=at(100), job=job(), trainer_pods=trainer_pods("Running"))
    quiet = decide(world, SETTINGS)
    assert quiet.recheck_after == 501.0
    assert decide(replace(world, now=at(100 + 501)), SETTINGS).delete_stage
    # The deadline (earlier than the stall here) of a run started at NOW.
    run = running_stage(stallTimeoutSeconds=600, activeDeadlineSeconds=120)
    world = seen(run, now=at(100), job=job(), trainer_pods=trainer_pods("Running"))
    assert decide(world, SETTINGS).recheck_after == 21.0
    ended = decide(replace(world, now=at(121)), SETTINGS)
    assert ended.status["phase"] == "Failed"
    # A finished run: only its TTL is timed, and without one nothing is.
    run = with_status(run, ended)
    assert decide(seen(run, now=at(130)), SETTINGS).recheck_after is None
    run["spec"]["ttlSecondsAfterFinished"] = 60
    assert decide(seen(run, now=at(130)), SETTINGS).recheck_after == 52.0
    assert decide(seen(run, now=at(182)), SETTINGS).delete_run


def test_a_suspended_run_times_nothing_but_its_deadline_clock_stops() -> None:
    run, _ = started()
    run["spec"]["activeDeadlineSeconds"] = 60
    run["spec"]["suspend"] = True
    plan = decide(seen(run, now=at(10)), SETTINGS)
    assert plan.status["phase"] == "Suspended" and plan.recheck_after is None


def test_a_rollout_pod_gone_while_its_trainer_ran_is_a_disruption_not_a_new_replica() -> None:
    """An eviction removes a pod moments after marking it, often before a pass sees the
    mark: the replica is simply gone. Beside a running trainer Job that is a lost server
    (the Job starts only once every replica is Ready): the stage restarts, uncounted,
    rather than getting a new server at a URL its trainer does not know."""
    run = running_stage(rollout_mode="separate")
    plan = decide(seen(run, job=job(), rollout_pods=[]), SETTINGS)
    assert plan.delete_stage
    assert (plan.status["restarts"], plan.status.get("disruptions")) == (0, 1)
    ((_, reason, message),) = plan.events
    assert reason == "Disrupted" and "rollout pod r-fre-r0-0 gone while the trainer ran" in message
    # With its server there, nothing happens; before the Job exists a missing replica is
    # one to create; once the Job has completed the servers are no longer needed.
    assert not decide(seen(run, job=job(), rollout_pods=[pod("r-fre-r0-0")]), SETTINGS).events
    waiting = decide(seen(run, rollout_pods=[]), SETTINGS)
    assert "Pod/r-fre-r0-0" in kinds(waiting.ensure) and not waiting.delete_stage
    done = decide(seen(run, job=job(complete=True), rollout_pods=[]), SETTINGS)
    assert done.status.get("disruptions") is None
