"""A de-duplicating work queue of runs with a fixed number of workers (client-go's
workqueue semantics, which controller-runtime and KubeRay build on).

- A key waits in the queue at most once: a burst of watch events for one run (its pods
  starting, its Job, a progress report) becomes one reconcile, not one per event.
- A key is never handled by two workers at once. Added while it is being handled, it is
  marked dirty and queued again when its worker finishes, so the change is not lost.
- `add_after` queues a key later (a retry after a conflict, a timed decision); a key waits
  for its earliest due time only (a pass each minute for a deadline a day away leaves one
  entry, not 1,440).
- Concurrency is explicit (`workers`), not whatever thread pool the watch library has.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

Key = tuple[str, str]  # (namespace, run name)
log = logging.getLogger("lmmr1.workqueue")


class WorkQueue:
    def __init__(
        self,
        handle: Callable[[Key], None],
        workers: int,
        on_depth: Callable[[int], None] | None = None,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self._handle = handle
        self._workers = workers
        self._on_depth = on_depth or (lambda _: None)
        self._on_wait = on_wait or (lambda _: None)
        # One lock, two conditions: workers wait for a key, the timer for a due time. (With
        # one condition, `notify()` for a new key could wake the timer instead of a worker,
        # and the key would wait for the next event.)
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        self._timer = threading.Condition(lock)
        self._queue: deque[Key] = deque()
        self._added_at: dict[Key, float] = {}  # queued keys, and since when
        self._processing: set[Key] = set()
        self._dirty: set[Key] = set()  # added again while being handled
        self._later: list[tuple[float, int, Key]] = []  # (due, tie-breaker, key)
        self._due: dict[Key, float] = {}  # each delayed key's earliest due time
        self._tie = itertools.count()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self._workers):
            worker = threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True)
            worker.start()
            self._threads.append(worker)
        timer = threading.Thread(target=self._release_due, name="workqueue-delays", daemon=True)
        timer.start()
        self._threads.append(timer)

    def shutdown(self, wait: float = 0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            self._timer.notify_all()
        deadline = time.monotonic() + wait
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def add(self, key: Key) -> None:
        with self._cond:
            if self._stopping:
                return
            if key in self._processing:
                self._dirty.add(key)
                return
            if key in self._added_at:
                return  # already waiting: one pass will see every change so far
            self._added_at[key] = time.monotonic()
            self._queue.append(key)
            self._on_depth(len(self._queue))
            self._cond.notify()

    def add_after(self, key: Key, seconds: float) -> None:
        if seconds <= 0:
            self.add(key)
            return
        due = time.monotonic() + seconds
        with self._cond:
            if self._due.get(key, float("inf")) <= due:
                return  # already due as early
            self._due[key] = due
            heapq.heappush(self._later, (due, next(self._tie), key))
            self._timer.notify()

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def idle(self) -> bool:
        """Nothing queued, delayed or being handled (for tests)."""
        with self._cond:
            return not (self._queue or self._processing or self._due)

    def delayed(self) -> int:
        """Keys waiting for a due time."""
        with self._cond:
            return len(self._due)

    def _release_due(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                due: list[Key] = []
                while self._later and self._later[0][0] <= now:
                    at, _, key = heapq.heappop(self._later)
                    if self._due.get(key) == at:  # else superseded by an earlier due time
                        del self._due[key]
                        due.append(key)
                wait = self._later[0][0] - now if self._later else None
                if not due:
                    self._timer.wait(wait)
                    continue
            for key in due:
                self.add(key)

    def _next(self) -> Key | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            key = self._queue.popleft()
            self._on_wait(time.monotonic() - self._added_at.pop(key))
            self._on_depth(len(self._queue))
            self._processing.add(key)
            return key

    def _done(self, key: Key) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                if not self._stopping and key not in self._added_at:
                    self._added_at[key] = time.monotonic()
                    self._queue.append(key)
                    self._cond.notify()

    def _work(self) -> None:
        while True:
            key = self._next()
            if key is None:
                return
            try:
                self._handle(key)
            except Exception:  # the handler reports its own errors; a worker never dies
                log.exception("handling %s/%s failed", *key)
            finally:
                self._done(key)
