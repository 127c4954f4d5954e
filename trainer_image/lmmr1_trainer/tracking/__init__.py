"""Experiment tracking from the trainer's rank 0: TensorBoard, MLflow and W&B, each optional
(`StageConfig.tracking`), each client imported only when its back end is enabled.

    tracker = Tracker.create(config, workdir)   # None: nothing enabled
    tracker.log_step(step, record)              # the step record train.py prints
    tracker.log_samples(step, samples)          # when tracker.samples_due(step)
    tracker.log_evaluation(step, {"mathvista": {"accuracy": 0.4}})
    tracker.checkpoint()                        # at each checkpoint: flush, upload files
    tracker.close()

A back end that fails at run time (its server down) costs a warning and a count, never the
stage; a back end that cannot be set up as configured (no client in the image, a storage
URI that cannot be opened) is a `TrackingConfigError` (exit 78).
"""

from lmmr1_trainer.tracking.backends import TrackingConfigError
from lmmr1_trainer.tracking.metrics import Sample, rollout_samples, sample_rows, step_metrics
from lmmr1_trainer.tracking.tracker import Tracker

__all__ = [
    "Sample",
    "Tracker",
    "TrackingConfigError",
    "rollout_samples",
    "sample_rows",
    "step_metrics",
]
