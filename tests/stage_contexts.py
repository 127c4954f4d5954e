"""A run object as the API server hands it to the operator, and the StageContext the
operator's builders take, for the unit tests of the builders (children/*)."""

from __future__ import annotations

from typing import Any

from lmmr1_operator.api.spec import LMMR1RunSpec
from lmmr1_operator.children.context import StageContext, init_weights
from lmmr1_operator.settings import OperatorSettings
from tests.invalid_runs import valid_run

SETTINGS = OperatorSettings(trainer_image="trainer:1", rollout_image="rollout:1")


def run_object(name: str = "r", **spec_updates: Any) -> dict[str, Any]:
    """A valid run with the metadata the API server adds (namespace, uid, generation)."""
    run = valid_run(name)
    run["metadata"].update(namespace="ns", uid="uid-1", generation=1)
    run["spec"].update(spec_updates)
    return run


def stage_context(
    run: dict[str, Any],
    index: int = 0,
    finals: list[str | None] | None = None,
    attempt: int = 0,
    settings: OperatorSettings = SETTINGS,
) -> StageContext:
    """Stage `index` of `run`; `finals`: the final checkpoints of the stages before it."""
    spec = LMMR1RunSpec.model_validate(run["spec"])
    return StageContext(
        run=run,
        spec=spec,
        index=index,
        settings=settings,
        init_from=init_weights(spec, index, finals or []),
        attempt=attempt,
    )
