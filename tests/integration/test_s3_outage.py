"""The trainer's S3 calls ride out a restart of the real S3 server (versitygw down for
longer than boto3's own retries last, ~15 s at most): a stage must not fail, and count
against backoffLimit, because its storage was away for a moment. The chaos test found
this: a trainer starting during an S3 restart failed its first listing."""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Any

import pytest

from lmmr1_testbed import bed, procs
from lmmr1_testbed.layout import TestBedState
from lmmr1_testbed.waiting import wait_for
from lmmr1_trainer.config import S3Settings
from lmmr1_trainer.storage import open_storage

pytestmark = pytest.mark.integration

OUTAGE_S = 20  # beyond boto3's retries (standard mode, 5 attempts: at most ~15 s of waits)


def test_a_trainer_storage_call_waits_out_an_s3_restart(
    testbed: TestBedState,
    s3_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for key, value in testbed.s3_env().items():
        monkeypatch.setenv(key, value)
    bucket = f"outage-{secrets.token_hex(3)}"
    s3_client.create_bucket(Bucket=bucket)
    storage = open_storage(
        f"s3://{bucket}/ckpt",
        S3Settings(endpoint=testbed.s3_endpoint, region=testbed.s3_region),
    )
    storage.put_bytes("step-2/manifest.json", b'{"step": 2}')

    port = testbed.ports["s3"]
    restart = threading.Thread(
        target=bed.restart_s3, args=(testbed,), kwargs={"down_seconds": OUTAGE_S}
    )
    restart.start()
    try:
        wait_for(
            "the S3 server down",
            lambda: not procs.port_is_open("127.0.0.1", port),
            timeout=30,
            state=testbed,
        )
        with caplog.at_level(logging.WARNING, "lmmr1.storage"):
            listed = [info.key for info in storage.list("")]
            data = storage.get_bytes("step-2/manifest.json")
    finally:
        restart.join(timeout=120)
    assert listed == ["step-2/manifest.json"] and data == b'{"step": 2}'
    assert any("S3 unreachable" in r.getMessage() for r in caplog.records)
    assert procs.port_is_open("127.0.0.1", port)
