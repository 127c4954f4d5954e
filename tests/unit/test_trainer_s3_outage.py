"""An S3 endpoint nobody answers on is waited out for LMMR1_S3_OUTAGE_SECONDS, then the
call fails with the URI (tests/integration/test_s3_outage.py restarts the real server)."""

from __future__ import annotations

import logging

import boto3
import pytest
from botocore.config import Config

from lmmr1_testbed.procs import free_port
from lmmr1_trainer.storage import OUTAGE_ENV, S3Storage, StorageError


def test_an_unreachable_endpoint_is_retried_within_the_budget_then_fails_with_the_uri(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    # One attempt per call: boto3's own retries (random back-off, seconds) would otherwise
    # use up the 2-second budget before the storage's first wait.
    client = boto3.session.Session(
        aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"
    ).client("s3", endpoint_url=closed, config=Config(retries={"max_attempts": 1}))
    storage = S3Storage("bucket", "runs", client)
    monkeypatch.setenv(OUTAGE_ENV, "2")
    with caplog.at_level(logging.WARNING, "lmmr1.storage"), pytest.raises(StorageError) as err:
        storage.list("step-1/")
    assert str(err.value).startswith("s3://bucket/runs/step-1/: Could not connect")
    waits = [r.getMessage() for r in caplog.records if "S3 unreachable" in r.getMessage()]
    assert waits and "retrying in 1s" in waits[0], waits
    # No budget: the first failure is final.
    caplog.clear()
    monkeypatch.setenv(OUTAGE_ENV, "0")
    with caplog.at_level(logging.WARNING, "lmmr1.storage"), pytest.raises(StorageError):
        storage.get_bytes("step-1/manifest.json")
    assert not [r for r in caplog.records if "S3 unreachable" in r.getMessage()]
