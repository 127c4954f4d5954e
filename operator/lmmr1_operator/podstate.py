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


def job_condition(job: Obj | None, kind: str) -> bool:
    if job is None:
        return False
    return any(
        c.get("type") == kind and c.get("status") == "True"
        for c in job.get("status", {}).get("conditions", [])
    )


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
