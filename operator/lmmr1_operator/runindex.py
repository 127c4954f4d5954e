"""Which runs the resync loop visits, from the runs' watch events (no API call).

Time-driven work (restart back-off, deadlines, the stall watchdog) needs a pass without a
cluster event, but only for runs that are not finished: a finished run has nothing left to
time except its ttlSecondsAfterFinished. So the loop visits every unfinished run, a
finished one once its TTL has passed or while its last pass failed (its children's
deletion is retried), and reads the run list from the watch the operator already holds
instead of listing every run every few seconds.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from typing import Any

FINISHED = ("Succeeded", "Failed")


@dataclass(frozen=True)
class _Entry:
    finished: bool
    delete_at: dt.datetime | None  # a finished run's TTL deadline, if it has one


def _parse(value: Any) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def entry(body: dict[str, Any]) -> _Entry:
    status = body.get("status") or {}
    finished = status.get("phase") in FINISHED
    ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
    completed = _parse(status.get("completionTime"))
    delete_at = None
    if finished and ttl is not None and completed is not None:
        delete_at = completed + dt.timedelta(seconds=int(ttl))
    return _Entry(finished, delete_at)


class RunIndex:
    """The runs the operator has seen, fed by every watch event of LMMR1Runs (thread-safe:
    kopf's handlers and the resync loop use it at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[tuple[str, str], _Entry] = {}
        self._failed: set[tuple[str, str]] = set()  # their last pass raised: retry them

    def update(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        with self._lock:
            self._runs[(meta["namespace"], meta["name"])] = entry(body)

    def remove(self, namespace: str, name: str) -> None:
        with self._lock:
            self._runs.pop((namespace, name), None)
            self._failed.discard((namespace, name))

    def passed(self, namespace: str, name: str, ok: bool) -> None:
        """How the run's last pass ended."""
        with self._lock:
            if ok:
                self._failed.discard((namespace, name))
            else:
                self._failed.add((namespace, name))

    def due(self, now: dt.datetime) -> list[tuple[str, str]]:
        """The runs a resync pass reconciles: every unfinished one, finished ones whose TTL
        has passed, and any whose last pass failed."""
        with self._lock:
            return [
                key
                for key, run in self._runs.items()
                if not run.finished
                or (run.delete_at is not None and run.delete_at <= now)
                or key in self._failed
            ]

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)
