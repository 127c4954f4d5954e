"""`wait_for`: a probe's failed assertion fails the test at once; anything else it raises
means "not yet" and is shown if the wait times out."""

from __future__ import annotations

import time

import pytest

from lmmr1_testbed.waiting import wait_for


def test_an_assertion_inside_the_probe_fails_at_once_with_its_own_message() -> None:
    calls = []

    def probe() -> bool:
        calls.append(1)
        assert len(calls) > 5, "the run failed while we waited"
        return True

    started = time.monotonic()
    with pytest.raises(AssertionError, match="the run failed while we waited"):
        wait_for("never", probe, timeout=3, interval=0.01)
    assert time.monotonic() - started < 2 and len(calls) == 1


def test_other_errors_mean_not_yet_and_are_shown_on_timeout() -> None:
    answers: list[Exception | str | None] = [ConnectionError("refused"), None, "", "ready"]
    results = iter(answers)

    def probe() -> str | None:
        value = next(results)
        if isinstance(value, Exception):
            raise value
        return value

    assert wait_for("ready", probe, timeout=5, interval=0.01) == "ready"

    def refused() -> None:
        raise ConnectionError("connection refused")

    with pytest.raises(AssertionError, match=r"(?s)timed out after 0s waiting for x.*refused"):
        wait_for("x", refused, timeout=0.05, interval=0.01)
