"""The tracker rank 0 holds: fans each call out to the enabled back ends, and keeps a back
end that fails from stopping the stage (a warning, a count, a pause before the next try)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmmr1_trainer.config import StageConfig, TrackingConfig
from lmmr1_trainer.tracking.backends import (
    Backend,
    MlflowBackend,
    TensorBoardBackend,
    TrackingConfigError,
    WandbBackend,
)
from lmmr1_trainer.tracking.metrics import Sample, evaluation_metrics, sample_rows, step_metrics

logger = logging.getLogger("lmmr1_trainer.tracking")
# After a failure a back end is left alone this long: a server that is down costs one
# timeout per pause, not one per call.
DEFAULT_PAUSE_S = 60.0

__all__ = ["Tracker", "TrackingConfigError", "hyperparameters"]


def hyperparameters(config: StageConfig) -> dict[str, str]:
    """The stage's hyperparameters, flat (`algorithm.learning_rate`, ...), as strings."""
    sections: dict[str, Any] = {
        "algorithm": config.algorithm.model_dump(mode="json"),
        "reward": config.reward.model_dump(mode="json", exclude={"url"}),
        "critic": config.critic.model_dump(mode="json") if config.critic else {},
        "dataset": config.dataset.model_dump(mode="json", include={"uri", "type"}),
        "rollout": config.rollout.model_dump(mode="json", include={"mode", "backend"}),
        "trainer": config.trainer.model_dump(mode="json", include={"nodes", "gpus_per_node"}),
    }
    flat = {"init_from": config.init_from, "stage": config.run.stage}
    for section, values in sections.items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = str(value)
    return flat


@dataclass
class _Slot:
    backend: Backend
    started: bool = False
    failures: int = 0
    dropped: int = 0  # calls skipped while paused after a failure
    paused_until: float = 0.0


class Tracker:
    def __init__(
        self,
        config: TrackingConfig,
        backends: Sequence[Backend],
        accuracy_weight: float | None = None,
        pause_s: float = DEFAULT_PAUSE_S,
    ) -> None:
        self.config = config
        self.slots = [_Slot(b) for b in backends]
        self.accuracy_weight = accuracy_weight
        self.pause_s = pause_s
        for slot in self.slots:
            self._call(slot, "start", lambda: None)

    @classmethod
    def create(cls, stage: StageConfig, workdir: Path) -> Tracker | None:
        """The tracker for `stage` (local files under `workdir/tracking`); None when no back
        end is enabled. Raises TrackingConfigError when one cannot run as configured."""
        config = stage.tracking
        if not config.enabled:
            return None
        params = hyperparameters(stage)
        local = workdir / "tracking"
        backends: list[Backend] = []
        if config.tensorboard is not None:
            backends.append(
                TensorBoardBackend(config.tensorboard, local / "tensorboard", stage.s3, params)
            )
        if config.mlflow is not None:
            backends.append(MlflowBackend(config.mlflow, stage.run, params))
        if config.wandb is not None:
            backends.append(WandbBackend(config.wandb, stage.run, params, local, stage.s3))
        return cls(config, backends, stage.reward.accuracy_weight)

    @property
    def failures(self) -> dict[str, int]:
        return {slot.backend.name: slot.failures for slot in self.slots}

    def _call(self, slot: _Slot, action: str, call: Callable[[], None]) -> None:
        now = time.monotonic()
        if now < slot.paused_until:
            slot.dropped += 1
            return
        try:
            if not slot.started:
                slot.backend.start()
                slot.started = True
            call()
        # Any failure of a tracking client (connection refused, HTTP 5xx, a full disk) is
        # the tracker's problem, never the stage's.
        except Exception as err:
            slot.failures += 1
            slot.paused_until = now + self.pause_s
            logger.warning(
                "tracking: %s %s failed (failure %d; training goes on, next try in %.0fs): %s",
                slot.backend.name,
                action,
                slot.failures,
                self.pause_s,
                err,
            )

    def _each(self, action: str, call: Callable[[Backend], None]) -> None:
        for slot in self.slots:
            self._call(slot, action, lambda slot=slot: call(slot.backend))  # type: ignore[misc]

    def log_step(self, step: int, record: dict[str, Any]) -> None:
        """The step record's measurements (see `step_metrics`)."""
        metrics = step_metrics(record, self.accuracy_weight)
        self._each("log_step", lambda b: b.log_metrics(step, metrics))

    def samples_due(self, step: int) -> bool:
        every = self.config.log_samples_every_steps
        return every > 0 and step % every == 0

    def log_samples(self, step: int, samples: Sequence[Sample]) -> None:
        rows = sample_rows(step, samples[: self.config.samples_per_table])
        self._each("log_samples", lambda b: b.log_samples(step, rows))

    def log_evaluation(self, step: int, results: dict[str, dict[str, float]]) -> None:
        """Evaluation results, dataset name -> metric -> value, as `eval/<dataset>/<metric>`."""
        metrics = evaluation_metrics(results)
        self._each("log_evaluation", lambda b: b.log_metrics(step, metrics))

    def checkpoint(self) -> None:
        """At a checkpoint: what is written locally goes to storage (a later attempt resumes
        from this step, so what it logs continues these files)."""
        self._each("flush", lambda b: b.flush())

    def close(self) -> None:
        for slot in self.slots:
            slot.paused_until = 0.0  # the last chance to get everything out
            self._call(slot, "close", slot.backend.close)
        for slot in self.slots:
            if slot.started:
                logger.info("tracking: %s", slot.backend.where())
            if slot.failures or slot.dropped:
                logger.warning(
                    "tracking: %s failed %d times and skipped %d calls while paused",
                    slot.backend.name,
                    slot.failures,
                    slot.dropped,
                )
