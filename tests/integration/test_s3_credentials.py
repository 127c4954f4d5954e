"""The trainer's S3 clients against the real S3 server: each client signs with the
credentials the environment has when it is made, and a checkpoint whose manifest cannot be
read for another reason than its absence says so (it is not reported as uncommitted)."""

from __future__ import annotations

from typing import Any

import pytest

from lmmr1_testbed.layout import TestBedState
from lmmr1_trainer.checkpoint import CheckpointError, CheckpointStore
from lmmr1_trainer.config import S3Settings
from lmmr1_trainer.storage import ObjectNotFound, StorageError, open_storage

pytestmark = pytest.mark.integration


def _open(testbed: TestBedState, uri: str) -> Any:
    return open_storage(uri, S3Settings(endpoint=testbed.s3_endpoint, region=testbed.s3_region))


def test_each_client_signs_with_the_credentials_of_its_time(
    testbed: TestBedState, s3_env: dict[str, str], s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """boto3's shared default session resolves credentials once per process: before the fix
    a client made with wrong keys made every later client in the process sign with them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-key")
    with pytest.raises(StorageError) as err:
        _open(testbed, f"s3://{s3_bucket}/ckpt").put_bytes("a", b"1")
    assert not isinstance(err.value, ObjectNotFound)

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    storage = _open(testbed, f"s3://{s3_bucket}/ckpt")
    storage.put_bytes("a", b"1")
    assert storage.get_bytes("a") == b"1"


def test_a_manifest_that_cannot_be_read_is_not_reported_as_uncommitted(
    testbed: TestBedState, s3_env: dict[str, str], s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(_open(testbed, f"s3://{s3_bucket}/ckpt"))
    with pytest.raises(CheckpointError, match=r"step-3 is not committed \(no manifest\)"):
        store.manifest(3)

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-key")
    denied = CheckpointStore(_open(testbed, f"s3://{s3_bucket}/ckpt"))
    with pytest.raises(CheckpointError) as err:
        denied.manifest(3)
    assert "its manifest cannot be read" in str(err.value), err.value
    assert "not committed" not in str(err.value)
