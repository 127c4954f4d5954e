"""The end-to-end tests' shared input: the demo's tiny model (warm-started) and datasets in
the test bed's S3 server, built once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from lmmr1_testbed.demo import seed
from lmmr1_testbed.layout import TestBedState


@pytest.fixture(scope="session")
def seeded(testbed: TestBedState, s3_client: Any) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, **testbed.s3_env(), "DS_ACCELERATOR": "cpu"}
        return seed.seed(s3_client, env, Path(work), warm_start_steps=40, dataset_rows=16)
