"""What the resync loop visits (`lmmr1_operator.runindex`): unfinished runs, finished ones
only when their TTL is due or their last pass failed; fed by watch events, no API list."""

from __future__ import annotations

import datetime as dt
from typing import Any

from lmmr1_operator.runindex import RunIndex

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


def run(name: str, phase: str | None = None, ttl: int | None = None, done: str = "") -> Any:
    spec = {} if ttl is None else {"ttlSecondsAfterFinished": ttl}
    status = {k: v for k, v in (("phase", phase), ("completionTime", done)) if v}
    return {"metadata": {"namespace": "ns", "name": name}, "spec": spec, "status": status}


def test_unfinished_runs_are_visited_and_finished_ones_are_not() -> None:
    index = RunIndex()
    for name, phase in (("new", None), ("pending", "Pending"), ("running", "Running")):
        index.update(run(name, phase))
    index.update(run("suspended", "Suspended"))
    index.update(run("done", "Succeeded", done="2026-01-01T11:00:00Z"))
    index.update(run("failed", "Failed", done="2026-01-01T11:00:00Z"))
    assert sorted(n for _, n in index.due(NOW)) == ["new", "pending", "running", "suspended"]
    assert len(index) == 6
    # The run finishes: the watch event of its status write takes it off the loop.
    index.update(run("running", "Succeeded", done="2026-01-01T12:00:00Z"))
    assert ("ns", "running") not in index.due(NOW)
    index.remove("ns", "new")
    assert ("ns", "new") not in index.due(NOW) and len(index) == 5


def test_a_finished_run_comes_back_when_its_ttl_passes() -> None:
    index = RunIndex()
    index.update(run("ttl", "Succeeded", ttl=600, done="2026-01-01T11:55:00Z"))
    assert index.due(NOW) == []
    assert index.due(NOW + dt.timedelta(minutes=5)) == [("ns", "ttl")]


def test_a_finished_run_whose_last_pass_failed_is_retried_until_one_passes() -> None:
    index = RunIndex()
    index.update(run("done", "Succeeded", done="2026-01-01T11:00:00Z"))
    index.passed("ns", "done", ok=False)  # e.g. deleting its pods failed
    assert index.due(NOW) == [("ns", "done")]
    index.passed("ns", "done", ok=True)
    assert index.due(NOW) == []
