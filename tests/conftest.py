"""Shared test configuration: the test-bed fixtures, and the integration marker applied to
everything under tests/integration and tests/e2e."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["lmmr1_testbed.pytest_plugin"]

_INTEGRATION_DIRS = {"integration", "e2e"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION_DIRS & set(Path(str(item.fspath)).parts):
            item.add_marker(pytest.mark.integration)
