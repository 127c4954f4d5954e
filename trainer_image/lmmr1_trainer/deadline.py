"""Blocking waits that end the attempt instead of hanging it.

A wait on another process (a rollout server taking new weights, an NCCL broadcast whose
peer died) can block forever. `within` runs it in a daemon thread and, past its timeout,
raises `AttemptFailed`: the trainer writes the reason as its termination message and exits
1 without waiting for the stuck thread, and the operator restarts the stage from its last
committed checkpoint, with that reason on the run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")


class AttemptFailed(RuntimeError):
    """This attempt of the stage cannot go on; another attempt may (not a config error)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason  # CamelCase, as a Kubernetes condition reason


def within(timeout_s: float, reason: str, what: str, call: Callable[[], _T]) -> _T:
    """`call()`'s result, or `AttemptFailed(reason)` when it takes longer than `timeout_s`.
    The call's own exception is raised as it is."""
    outcome: list[_T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as err:  # handed to the waiting thread
            error.append(err)

    thread = threading.Thread(target=run, name=f"deadline: {what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise AttemptFailed(reason, f"{what} did not finish within {timeout_s:g} s")
    if error:
        raise error[0]
    return outcome[0]
