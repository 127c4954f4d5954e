"""Reading pod and Job states (pure): readiness, failures, exit codes, why pods are stuck."""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]

IMAGE_ERRORS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_ERRORS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}


def phase(pod: Obj) -> str:
    return str(pod.get("status", {}).get("phase") or "Pending")


def is_ready(pod: Obj) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in pod.get("status", {}).get("conditions", [])
    )


def _statuses(pod: Obj) -> list[Obj]:
    status = pod.get("status", {})
    return list(status.get("initContainerStatuses", [])) + list(status.get("containerStatuses", []))


def terminated(pod: Obj, container: str) -> Obj | None:
    for status in _statuses(pod):
        if status.get("name") == container:
            state = status.get("state", {}).get("terminated")
            return dict(state) if state else None
    return None


def exit_code(pod: Obj, container: str) -> int | None:
    state = terminated(pod, container)
    return int(state["exitCode"]) if state and "exitCode" in state else None


def termination_message(pod: Obj, container: str) -> str:
    state = terminated(pod, container)
    return str(state.get("message", "")) if state else ""


def exited_with(pod: Obj, code: int) -> tuple[str, str] | None:
    """(container, termination message) of the first container, init and sidecar
    containers included, that exited with `code`: now, or before the kubelet restarted it
    (a native sidecar is restarted whatever its exit code, so its pod never fails)."""
    for status in _statuses(pod):
        for key in ("state", "lastState"):
            state = (status.get(key) or {}).get("terminated") or {}
            if state.get("exitCode") is not None and int(state["exitCode"]) == code:
                return str(status.get("name", "")), str(state.get("message") or "").strip()
    return None


# How much of a failed container's termination message goes into the run's Event and
# condition (the kubelet keeps up to 4096 bytes; an Event message, 1024).
MAX_FAILURE_MESSAGE = 300


def failed_containers(pod: Obj) -> list[tuple[str, int, str]]:
    """(container, exit code, termination message) of every container that ended with a
    non-zero code; the message (why, as the container said it) is cut to a readable length."""
    out = []
    for status in _statuses(pod):
        state = (status.get("state") or {}).get("terminated") or {}
        if state.get("exitCode"):
            message = _readable(state.get("message"))
            out.append((str(status.get("name", "")), int(state["exitCode"]), message))
    return out


def _readable(message: object) -> str:
    """A message on one line, cut to MAX_FAILURE_MESSAGE characters."""
    text = " ".join(str(message or "").split())
    if len(text) > MAX_FAILURE_MESSAGE:
        text = text[: MAX_FAILURE_MESSAGE - 3] + "..."
    return text


# The pod condition Kubernetes sets on a pod it is about to end for reasons of its own
# (reasons PreemptionByScheduler, DeletionByTaintManager, EvictionByEvictionAPI,
# DeletionByPodGC, TerminationByKubelet): a disruption, not the workload's failure.
DISRUPTION_TARGET = "DisruptionTarget"


def disruption(pod: Obj) -> tuple[str, str] | None:
    """(reason, message) of the pod's DisruptionTarget condition once the pod is ending
    because of it (Failed, or terminating); None otherwise. A pod that only carries the
    condition still runs: the deletion that follows it may not come (Kubernetes removes a
    condition no deletion followed), so it is not counted yet."""
    status = pod.get("status", {})
    ending = phase(pod) == "Failed" or bool(pod.get("metadata", {}).get("deletionTimestamp"))
    if not ending:
        return None
    for condition in status.get("conditions", []):
        if condition.get("type") == DISRUPTION_TARGET and condition.get("status") == "True":
            return str(condition.get("reason") or ""), _readable(condition.get("message"))
    return None


def job_condition(job: Obj | None, kind: str) -> bool:
    if job is None:
        return False
    return any(
        c.get("type") == kind and c.get("status") == "True"
        for c in job.get("status", {}).get("conditions", [])
    )


def job_disruption(job: Obj | None) -> str | None:
    """The message of the Job's Failed (or FailureTarget) condition when its pod failure
    policy failed it for a disrupted pod ("Pod ns/name has condition DisruptionTarget
    matching FailJob rule at index 0"): the Job says so after the pod itself is gone."""
    if job is None:
        return None
    for condition in job.get("status", {}).get("conditions", []):
        message = str(condition.get("message") or "")
        if (
            condition.get("type") in ("Failed", "FailureTarget")
            and condition.get("status") == "True"
            and condition.get("reason") == "PodFailurePolicy"
            and f"has condition {DISRUPTION_TARGET} " in message
        ):
            return message
    return None


def why_stuck(pods: list[Obj]) -> tuple[str, str] | None:
    """(reason, message) when a pod cannot make progress on its own, else None."""
    for pod in pods:
        name = pod["metadata"]["name"]
        for condition in pod.get("status", {}).get("conditions", []):
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                return "Unschedulable", f"pod {name}: {condition.get('message', '')}"
        for status in _statuses(pod):
            waiting = status.get("state", {}).get("waiting") or {}
            reason = waiting.get("reason", "")
            if reason in IMAGE_ERRORS:
                return "ImagePullError", (
                    f"pod {name} container {status['name']}: {reason}: "
                    f"{waiting.get('message', status.get('image', ''))}"
                )
            if reason in CONFIG_ERRORS:
                return "ContainerConfigError", (
                    f"pod {name} container {status['name']}: {waiting.get('message', reason)}"
                )
    return None


def _event_time(event: Obj) -> str:
    meta = event.get("metadata") or {}
    return str(
        event.get("lastTimestamp")
        or event.get("eventTime")
        or event.get("firstTimestamp")
        or meta.get("creationTimestamp")
        or ""
    )


def job_create_failure(job: Obj, pods: list[Obj], events: list[Obj]) -> str | None:
    """Why the Job controller could not create the Job's pods (the newest of its
    FailedCreate Events: Pod Security, a quota, a missing ServiceAccount), while the Job
    has fewer pods than it runs at once; None otherwise. The Job's status says nothing."""
    wanted = int((job.get("spec") or {}).get("parallelism") or 1)
    if len(pods) >= wanted:
        return None
    failures = [e for e in events if e.get("reason") == "FailedCreate"]
    if not failures:
        return None
    return str(max(failures, key=_event_time).get("message") or "FailedCreate")


def describe_failed(pods: list[Obj]) -> str:
    """`name (container exit code: message, ...)` for each failed pod."""
    return ", ".join(
        f"{p['metadata']['name']} ("
        + (
            ", ".join(
                f"{c} exit {code}" + (f": {message}" if message else "")
                for c, code, message in failed_containers(p)
            )
            or "no exit code"
        )
        + ")"
        for p in pods
    )
