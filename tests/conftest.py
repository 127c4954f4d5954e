"""Shared test configuration: the test-bed fixtures, and the integration marker applied to
everything under tests/integration and tests/e2e."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest_plugins = ["lmmr1_testbed.pytest_plugin"]

_INTEGRATION_DIRS = {"integration", "e2e"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION_DIRS & set(Path(str(item.fspath)).parts):
            item.add_marker(pytest.mark.integration)


_EXIT: dict[str, int] = {}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without interpreter teardown once pytest has reported: native threads of vLLM
    and torch abort at teardown ("terminate called without an active exception") after
    every test passed, which turned a green run into exit 134."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT.get("status", 0))
