"""Shared test configuration: the test-bed fixtures, the integration marker applied to
everything under tests/integration and tests/e2e, and the order of the suite: unit tests
first (fast, no test bed, not slowed by the trainers and pods of the others), then
integration, then end to end."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest_plugins = ["lmmr1_testbed.pytest_plugin"]

_INTEGRATION_DIRS = {"integration", "e2e"}
_ORDER = ("unit", "integration", "e2e")  # anything else runs with the unit tests


def suite_rank(path: Path) -> int:
    """0 for unit tests (and anything not under integration/ or e2e/), 1, then 2."""
    parts = set(path.parts)
    return max((i for i, name in enumerate(_ORDER) if name in parts), default=0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _INTEGRATION_DIRS & set(Path(str(item.fspath)).parts):
            item.add_marker(pytest.mark.integration)
    # A stable sort: within each part, pytest's own order (files, then definitions).
    items.sort(key=lambda item: suite_rank(Path(str(item.fspath))))


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
