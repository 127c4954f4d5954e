"""An S3 endpoint nobody answers on is waited out for LMMR1_S3_OUTAGE_SECONDS, then the
call fails with the URI (tests/integration/test_s3_outage.py restarts the real server)."""

from __future__ import annotations

import logging

import pytest

from lmmr1_testbed.procs import free_port
from lmmr1_trainer.config import S3Settings
from lmmr1_trainer.storage import OUTAGE_ENV, StorageError, open_storage


def test_an_unreachable_endpoint_is_retried_within_the_budget_then_fails_with_the_uri(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    storage = open_storage("s3://bucket/runs", S3Settings(endpoint=closed, region="us-east-1"))
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
