"""Everything a stage's builders need, resolved once from the run and operator settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmmr1_operator.api.spec import LMMR1RunSpec, Stage
from lmmr1_operator.settings import OperatorSettings


@dataclass(frozen=True)
class StageContext:
    run: dict[str, Any]  # the LMMR1Run object as the API returned it
    spec: LMMR1RunSpec
    index: int
    settings: OperatorSettings
    init_from: str  # the weights this stage starts from
    attempt: int = 0  # the stage's restart count

    @property
    def stage(self) -> Stage:
        return self.spec.stages[self.index]

    @property
    def name(self) -> str:
        return str(self.run["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.run["metadata"]["namespace"])

    @property
    def uid(self) -> str:
        return str(self.run["metadata"]["uid"])

    @property
    def run_uri(self) -> str:
        """Everything this run writes lives under here. The run's UID is part of it: a run
        deleted and created again under the same name starts afresh instead of silently
        resuming the old run's checkpoints (an explicit initFrom continues from them)."""
        base = self.spec.storage.uri.rstrip("/")
        return f"{base}/{self.namespace}/{self.name}/{self.uid}"

    @property
    def checkpoint_uri(self) -> str:
        return f"{self.run_uri}/{self.stage.name}"

    def tracking_uri(self, kind: str) -> str:
        """Where a tracker's files go, beside the checkpoints: one folder per kind (so that
        `tensorboard --logdir <…>/tensorboard` shows every stage of the run), one per stage."""
        return f"{self.run_uri}/{kind}/{self.stage.name}"

    @property
    def s3_endpoint(self) -> str | None:
        return self.spec.storage.endpoint or self.settings.default_s3_endpoint

    @property
    def s3_region(self) -> str | None:
        return self.spec.storage.region or self.settings.default_s3_region

    @property
    def s3_secret(self) -> str | None:
        return self.spec.storage.credentials_secret or self.settings.default_s3_secret

    @property
    def trainer_image(self) -> str:
        return self.spec.images.trainer or self.settings.trainer_image

    @property
    def rollout_image(self) -> str:
        return self.spec.images.rollout or self.settings.rollout_image


def init_weights(spec: LMMR1RunSpec, index: int, final_checkpoints: list[str | None]) -> str:
    """Where stage `index` starts: its own initFrom, the model (first stage), or the previous
    stage's final checkpoint."""
    stage = spec.stages[index]
    if stage.init_from:
        return stage.init_from
    if index == 0:
        return spec.model.uri
    previous = final_checkpoints[index - 1] if index - 1 < len(final_checkpoints) else None
    if not previous:
        raise ValueError(
            f"stage {stage.name!r} starts before stage {index - 1} has a final checkpoint"
        )
    return previous
