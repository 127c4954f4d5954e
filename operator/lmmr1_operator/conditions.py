"""Standard conditions (metav1.Condition) on the run's status (pure)."""

from __future__ import annotations

from typing import Literal

from lmmr1_operator.api.status import Condition

RUNNING = "Running"
SUSPENDED = "Suspended"
COMPLETE = "Complete"
FAILED = "Failed"
BLOCKED = "Blocked"  # True while pods cannot make progress (missing Secret, bad image, ...)
# False while the API server refuses to create a child (Pod Security, a quota, a missing
# ServiceAccount, ...), or the trainer Job's pods; set once something was refused.
CHILDREN_CREATED = "ChildrenCreated"
# False while the operator's passes on the run fail (an API or S3 error it retries); set
# once one failed.
RECONCILED = "Reconciled"
# Runs with spec.queueName only: True while Kueue admits the stage's JobSet; False with
# Kueue's reason and message while it waits in its queue or after an eviction.
ADMITTED = "Admitted"


def set_condition(
    conditions: list[Condition],
    kind: str,
    true: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> list[Condition]:
    """A copy with `kind` set; lastTransitionTime moves only when the status flips."""
    status: Literal["True", "False"] = "True" if true else "False"
    previous = next((c for c in conditions if c.type == kind), None)
    updated = Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=(
            previous.last_transition_time
            if previous is not None and previous.status == status
            else now
        ),
        observed_generation=generation,
    )
    if previous is None:
        return [*conditions, updated]
    return [updated if c.type == kind else c for c in conditions]


def get(conditions: list[Condition], kind: str) -> Condition | None:
    return next((c for c in conditions if c.type == kind), None)


def is_true(conditions: list[Condition], kind: str) -> bool:
    return any(c.type == kind and c.status == "True" for c in conditions)
