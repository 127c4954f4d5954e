"""Seed the demo's S3 bucket: a tiny Qwen2.5-VL-architecture model and two synthetic
datasets (text arithmetic for FRE, counting shapes in images for MGT), each with a small
held-out set drawn with another seed for the stage's evaluation, built locally by the
trainer's own tools and uploaded, as a user would upload theirs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

BUCKET = "lmmr1-demo"
MODEL_PREFIX = "models/tiny-qwen25vl"
CHECKPOINTS_PREFIX = "checkpoints/"
DATASETS = {"fre": ("arithmetic", 64), "mgt": ("counting", 64)}
TRAIN_SEED = 7
# Held-out sets (examples/run-tiny.yaml's evaluation): another seed, and few rows, so that
# a greedy evaluation costs less than a training step.
HELDOUT_SEED = 8
HELDOUT_ROWS = 16


def _run(argv: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout}\n{result.stderr}")


def upload_dir(s3: Any, directory: Path, bucket: str, prefix: str) -> int:
    count = 0
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory)}")
            count += 1
    return count


def delete_prefix(s3: Any, bucket: str, prefix: str) -> int:
    deleted = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
            deleted += len(keys)
    return deleted


def seed(
    s3: Any,
    env: dict[str, str],
    work: Path,
    *,
    warm_start_steps: int,
    dataset_rows: int | None = None,
) -> dict[str, str]:
    """Build and upload everything the run reads; returns the URIs."""
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=BUCKET)
    # A demo on a kept test bed starts over: an earlier run's checkpoints would be resumed.
    delete_prefix(s3, BUCKET, CHECKPOINTS_PREFIX)
    model_dir = work / "model"
    _run(
        [
            sys.executable,
            "-m",
            "lmmr1_trainer.tiny_model",
            str(model_dir),
            "--warm-start-steps",
            str(warm_start_steps),
        ],
        env,
    )
    upload_dir(s3, model_dir, BUCKET, MODEL_PREFIX)
    uris = {"model": f"s3://{BUCKET}/{MODEL_PREFIX}"}
    for stage, (task, rows) in DATASETS.items():
        uris[stage] = _synthetic(env, task, dataset_rows or rows, TRAIN_SEED, stage)
        uris[f"{stage}-heldout"] = _synthetic(
            env, task, HELDOUT_ROWS, HELDOUT_SEED, f"{stage}-heldout"
        )
    return uris


def _synthetic(env: dict[str, str], task: str, rows: int, seed: int, folder: str) -> str:
    """One synthetic dataset under s3://<bucket>/datasets/<folder>/; its JSONL's URI."""
    # Written straight to S3, so the rows name their images by s3:// URI.
    prefix = f"s3://{BUCKET}/datasets/{folder}"
    _run(
        [
            sys.executable,
            "-m",
            "lmmr1_trainer.synthetic",
            "--task",
            task,
            "--count",
            str(rows),
            "--seed",
            str(seed),
            "--out",
            prefix,
            "--s3-endpoint",
            env["AWS_ENDPOINT_URL"],
        ],
        env,
    )
    return f"{prefix}/train.jsonl"
