"""Final-checkpoint checks off the reconcile path.

Before the next stage starts from a final checkpoint, the operator confirms its manifest in
S3. The endpoint is the tenant's choice: a slow or unreachable one must cost that run a
wait, never another run's reconcile. So a check runs in a small thread pool; a reconcile
asks for the verdict, gets None while the check runs (the run stays as it is), and the
check's end triggers another reconcile of that run. A failed check (an S3 error, not
"no such manifest") is kept for `retry_after_s` so the run can show it, then tried again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger("lmmr1.verification")

RunKey = tuple[str, str, str]  # namespace, name, uid
RETRY_AFTER_S = 30.0  # a failed check is shown this long, then tried again


@dataclass(frozen=True)
class Verdict:
    committed: bool | None  # None: the check itself failed (see `error`)
    error: str = ""
    finished_at: float = 0.0  # monotonic


class CheckpointVerifier:
    def __init__(
        self,
        on_done: Callable[[str, str], None],
        workers: int = 4,
        retry_after_s: float = RETRY_AFTER_S,
    ) -> None:
        self.on_done = on_done  # reconcile (namespace, name) again
        self.retry_after_s = retry_after_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify")
        self._lock = threading.Lock()
        self._verdicts: dict[tuple[RunKey, str], Verdict] = {}
        self._pending: dict[tuple[RunKey, str], Future[None]] = {}

    def verdict(self, run: RunKey, uri: str, check: Callable[[], bool]) -> Verdict | None:
        """The verdict on `uri` for `run`, or None while `check` (started now if it is not
        running) has not answered."""
        key = (run, uri)
        with self._lock:
            found = self._verdicts.get(key)
            if found is not None:
                stale = time.monotonic() - found.finished_at >= self.retry_after_s
                if found.committed is not None or not stale:
                    return found
                del self._verdicts[key]  # a failed check, old enough to try again
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self._run, key, check)
            return None

    def _run(self, key: tuple[RunKey, str], check: Callable[[], bool]) -> None:
        try:
            verdict = Verdict(check(), finished_at=time.monotonic())
        except Exception as err:  # S3 unreachable, access denied, a bad Secret
            log.warning("checking %s for %s/%s failed: %s", key[1], key[0][0], key[0][1], err)
            verdict = Verdict(None, f"{type(err).__name__}: {err}", time.monotonic())
        with self._lock:
            self._pending.pop(key, None)
            self._verdicts[key] = verdict
        namespace, name, _ = key[0]
        self.on_done(namespace, name)

    def forget(self, namespace: str, name: str) -> None:
        """Drop what is known about a run (deleted, or finished)."""
        with self._lock:
            for key in [k for k in self._verdicts if k[0][:2] == (namespace, name)]:
                del self._verdicts[key]

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
