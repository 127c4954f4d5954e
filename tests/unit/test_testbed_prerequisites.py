"""A missing prerequisite is one clear line, not a stack trace."""

from __future__ import annotations

import subprocess

from lmmr1_testbed.layout import BUILD_SCRIPT


def test_build_without_go_says_what_to_install() -> None:
    result = subprocess.run(
        ["/bin/bash", str(BUILD_SCRIPT)],
        env={"PATH": "/nonexistent"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 127
    assert result.stderr.strip().splitlines() == [
        "testbed: 'go' not found: install Go >= 1.26 (https://go.dev/doc/install)"
    ]


def test_cli_reports_a_missing_prerequisite_in_one_line() -> None:
    import sys

    from lmmr1_testbed.layout import REPO_ROOT

    result = subprocess.run(
        [sys.executable, "-m", "lmmr1_testbed", "build"],
        env={"PATH": "/nonexistent:/bin", "PYTHONPATH": str(REPO_ROOT / "testbed")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 127
    assert result.stderr.strip().splitlines() == [
        "testbed: 'go' not found: install Go >= 1.26 (https://go.dev/doc/install)"
    ]
