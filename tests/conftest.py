"""Shared test configuration: the test-bed fixtures, the integration marker applied to
everything under tests/integration and tests/e2e, and the order of the suite: unit tests
first (fast, no test bed, not slowed by the trainers and pods of the others), then
integration, then end to end, then the tests against Kueue and JobSet (marked `batch`):
last, so that on a cold machine their controllers build while everything else runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmmr1_testbed import bed
from lmmr1_testbed.layout import build_binaries_in_background

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
    items.sort(
        key=lambda item: (
            item.get_closest_marker("batch") is not None,
            suite_rank(Path(str(item.fspath))),
        )
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """With integration tests selected (after `-m`/`-k`) and no test bed up, build its
    binaries in the background while the unit tests run (minutes on a cold machine)."""
    selected = any(item.get_closest_marker("integration") for item in session.items)
    if selected and bed.status() is None:
        _BUILD["prebuild"] = build_binaries_in_background()


_EXIT: dict[str, int] = {}
_BUILD: dict[str, subprocess.Popen[bytes] | None] = {}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT["status"] = int(exitstatus)
    build = _BUILD.get("prebuild")
    if build is not None and build.poll() is None:  # the session ended before it was needed
        os.killpg(build.pid, signal.SIGTERM)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without interpreter teardown once pytest has reported: native threads of vLLM
    and torch abort at teardown ("terminate called without an active exception") after
    every test passed, which turned a green run into exit 134."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT.get("status", 0))
