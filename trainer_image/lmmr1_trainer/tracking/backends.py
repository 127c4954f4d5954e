"""The three back ends behind one small interface. Each imports its client in `__init__`
(only when enabled; a missing client is a configuration error of the image) and connects in
`start` (a failure there is a run-time failure: the tracker retries later)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

from lmmr1_trainer.config import (
    MlflowConfig,
    RunRef,
    S3Settings,
    TensorBoardConfig,
    WandbConfig,
)
from lmmr1_trainer.storage import Storage, StorageError, open_storage, upload_tree
from lmmr1_trainer.tracking.metrics import SAMPLE_COLUMNS

logger = logging.getLogger("lmmr1_trainer.tracking")
# A down tracking server must cost a step seconds, not minutes: the MLflow client's default
# is 7 retries with exponential backoff (over 4 minutes per call).
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
STAGE_KEY_TAG = "lmmr1.stage_key"


class TrackingConfigError(ValueError):
    """A back end cannot run as configured (exit 78): the message names the field."""


class Backend(Protocol):
    name: str

    def start(self) -> None: ...
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_samples(self, step: int, rows: list[list[Any]]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def where(self) -> str: ...


def stage_key(run: RunRef) -> str:
    """Names this stage of this run (the same across attempts): what a resume finds its
    MLflow run and W&B run by."""
    return f"{run.namespace}/{run.name}/{run.uid or '-'}/{run.stage}"


def _open(uri: str, field: str, s3: S3Settings) -> Storage:
    try:
        return open_storage(uri, s3)
    except StorageError as err:
        raise TrackingConfigError(f"{field}: {err}") from err


def _missing_client(field: str, package: str, err: ImportError) -> TrackingConfigError:
    return TrackingConfigError(
        f"{field} is enabled but the trainer image has no {package} ({err}); "
        f"install it (the image's `trainer` extra has it) or disable {field}"
    )


def _markdown_table(rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    head = "| " + " | ".join(SAMPLE_COLUMNS) + " |\n|" + "---|" * len(SAMPLE_COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(cell(v) for v in row) + " |\n" for row in rows)


class TensorBoardBackend:
    """Event files through tensorboardX (no TensorFlow), uploaded to `uri` on `flush`."""

    name = "tensorboard"

    def __init__(
        self, config: TensorBoardConfig, local_dir: Path, s3: S3Settings, params: dict[str, str]
    ) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError as err:
            raise _missing_client("tracking.tensorboard", "tensorboardX", err) from err
        self._writer_type = SummaryWriter
        self.uri = config.uri
        self.storage = _open(config.uri, "tracking.tensorboard.uri", s3)
        self.local_dir = local_dir
        self.params = params
        self.writer: Any = None

    def start(self) -> None:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        # A new event file per attempt (the name has the time, the host and this pid):
        # earlier attempts' files stay in storage and TensorBoard merges them.
        self.writer = self._writer_type(
            logdir=str(self.local_dir), flush_secs=60, filename_suffix=f".{os.getpid()}"
        )
        table = "| parameter | value |\n|---|---|\n" + "".join(
            f"| {k} | {v} |\n" for k, v in self.params.items()
        )
        self.writer.add_text("hyperparameters", table, 0)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_samples(self, step: int, rows: list[list[Any]]) -> None:
        self.writer.add_text("samples", _markdown_table(rows), step)

    def flush(self) -> None:
        self.writer.flush()
        upload_tree(self.storage, self.local_dir, "")

    def close(self) -> None:
        self.writer.close()
        upload_tree(self.storage, self.local_dir, "")

    def where(self) -> str:
        return f"tensorboard event files in {self.uri}"


def mlflow_key(key: str) -> str:
    """MLflow takes letters, digits, _ - . / and spaces in metric names."""
    return re.sub(r"[^\w\-./ ]", "_", key)


class MlflowBackend:
    """One MLflow run per stage in the run's experiment, found again on resume by its
    `lmmr1.stage_key` tag; params are the stage's hyperparameters, the samples tables are
    JSON artifacts (`samples/step-<N>.json`, MLflow's table layout)."""

    name = "mlflow"

    def __init__(self, config: MlflowConfig, run: RunRef, params: dict[str, str]) -> None:
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise _missing_client("tracking.mlflow", "MLflow client (mlflow-skinny)", err) from err
        for key, value in MLFLOW_CLIENT_ENV.items():
            os.environ.setdefault(key, value)
        self._types = (MlflowClient, Metric, Param)
        self.config = config
        self.run = run
        self.params = params
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    def start(self) -> None:
        client_type, _, param_type = self._types
        client = client_type(tracking_uri=self.config.tracking_uri)
        experiment = client.get_experiment_by_name(self.config.experiment)
        if experiment is None:
            try:
                self.experiment_id = client.create_experiment(self.config.experiment)
            except Exception:  # another stage created it meanwhile
                experiment = client.get_experiment_by_name(self.config.experiment)
                if experiment is None:
                    raise
                self.experiment_id = experiment.experiment_id
        else:
            self.experiment_id = experiment.experiment_id
        key = stage_key(self.run)
        found = client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{STAGE_KEY_TAG}` = '{key}'",
            max_results=1,
        )
        if found:  # a resumed attempt: the same run, its metrics continue
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {
                STAGE_KEY_TAG: key,
                "lmmr1.namespace": self.run.namespace,
                "lmmr1.run": self.run.name,
                "lmmr1.stage": self.run.stage,
            }
            created = client.create_run(self.experiment_id, tags=tags, run_name=self.run.stage)
            self.run_id = created.info.run_id
            params = [param_type(k, v[:6000]) for k, v in self.params.items()]
            for start in range(0, len(params), 100):  # log_batch takes 100 params at most
                client.log_batch(self.run_id, params=params[start : start + 100])
        self.client = client

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        _, metric_type, _ = self._types
        now = int(time.time() * 1000)
        batch = [metric_type(mlflow_key(k), v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_samples(self, step: int, rows: list[list[Any]]) -> None:
        table = {"columns": list(SAMPLE_COLUMNS), "data": rows}
        self.client.log_dict(self.run_id, table, f"samples/step-{step:06d}.json")

    def flush(self) -> None:
        pass  # every call went to the server already

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")

    def where(self) -> str:
        return (
            f"mlflow run {self.run_id} in experiment {self.config.experiment!r} "
            f"({self.experiment_id}) at {self.config.tracking_uri}"
        )


class WandbBackend:
    """A W&B run per stage (its id derived from the stage key, so a resume continues it);
    offline runs are written under the scratch directory and uploaded to `uri`."""

    name = "wandb"

    def __init__(
        self,
        config: WandbConfig,
        run: RunRef,
        params: dict[str, str],
        local_dir: Path,
        s3: S3Settings,
    ) -> None:
        try:
            import wandb
        except ImportError as err:
            raise _missing_client("tracking.wandb", "wandb", err) from err
        self.wandb = wandb
        self.config = config
        self.run_ref = run
        self.params = params
        self.local_dir = local_dir
        self.storage = (
            _open(config.uri, "tracking.wandb.uri", s3)
            if config.uri and config.mode == "offline"
            else None
        )
        self.run: Any = None

    @property
    def run_id(self) -> str:
        return hashlib.sha256(stage_key(self.run_ref).encode()).hexdigest()[:16]

    def start(self) -> None:
        self.local_dir.mkdir(parents=True, exist_ok=True)
        # The pods' root filesystem is read-only: every place wandb writes is under the
        # scratch directory unless the pod says otherwise.
        for variable, sub in (
            ("WANDB_CACHE_DIR", "cache"),
            ("WANDB_CONFIG_DIR", "config"),
            ("WANDB_DATA_DIR", "data"),
            ("WANDB_ARTIFACT_DIR", "artifacts"),
        ):
            os.environ.setdefault(variable, str(self.local_dir / sub))
        # wandb.setup() in a parent process (a launcher, a notebook, a test runner) leaves
        # WANDB_SERVICE in the environment, and wandb.init would then log through the
        # parent's wandb-core: a killed attempt's run stays open there, and the next
        # attempt's init under the same id writes nothing of its own. Each trainer process
        # owns its core, which dies with it.
        os.environ.pop("WANDB_SERVICE", None)
        ref = self.run_ref
        self.run = self.wandb.init(
            project=self.config.project,
            entity=self.config.entity,
            mode=self.config.mode,
            dir=str(self.local_dir),
            id=self.run_id,
            resume="allow",
            name=f"{ref.namespace}/{ref.name}/{ref.stage}",
            group=f"{ref.namespace}/{ref.name}",
            job_type=ref.stage,
            config=self.params,
            # stdout carries the step log the operator and tests parse: wandb must not wrap
            # it; and no system-stats sampler on a busy rank 0.
            settings=self.wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[list[Any]]) -> None:
        table = self.wandb.Table(columns=list(SAMPLE_COLUMNS), data=rows)
        self.run.log({"samples": table}, step=step)

    def _upload(self) -> None:
        offline = self.local_dir / "wandb"
        if self.storage is not None and offline.is_dir():
            upload_tree(self.storage, offline, "")

    def flush(self) -> None:
        self._upload()

    def close(self) -> None:
        self.run.finish()
        self._upload()

    def where(self) -> str:
        if self.config.mode == "offline":
            target = self.config.uri or str(self.local_dir / "wandb")
            return f"wandb offline run {self.run_id} in {target} (`wandb sync` uploads it)"
        return f"wandb run {self.run_id} in project {self.config.project}"
