"""A pool of verifier worker processes with a wall-clock limit per sample.

Why not `concurrent.futures.ProcessPoolExecutor`: it cannot stop one hung task, and one dead
worker breaks the whole executor. Here each worker owns a pipe; `run()` hands samples to idle
workers, waits on their pipes, and when a sample runs past `timeout_s` (or its worker dies)
kills that worker, scores the sample as TIMEOUT (or ERROR) and moves on with the rest of the
batch. A background thread starts replacements (from a forkserver that has already imported
math-verify) and adds them to the idle set once they report ready. `run()` is thread-safe:
concurrent requests share the workers.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import TracebackType

from lmmr1_trainer.verifier import worker as worker_module
from lmmr1_trainer.verifier.config import AccuracySettings
from lmmr1_trainer.verifier.rewards import AccuracyOutcome, AccuracyRequest, AccuracyStatus

_POLL_S = 0.02  # how often a batch waiting on busy workers looks for idle ones
_MAX_RESPAWN_DELAY_S = 30.0


class PoolStartError(RuntimeError):
    """The workers did not start (a plug-in failed to import, or start_timeout_s passed)."""


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    connection: Connection

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()
            self.process.join(timeout=2.0)
        with contextlib.suppress(Exception):
            self.connection.close()


class VerifierPool:
    """`size` worker processes; see the module docstring."""

    def __init__(
        self,
        size: int,
        settings: AccuracySettings,
        plugins: Sequence[str] = (),
        memory_mb: int | None = None,
        start_timeout_s: float = 60.0,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one worker")
        self.size = size
        self._settings_json = settings.model_dump_json()
        self._plugins = tuple(plugins)
        self._memory_mb = memory_mb
        self._start_timeout_s = start_timeout_s
        self._on_restart = on_restart
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([worker_module.__name__])
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: set[_Worker] = set()
        self._lock = threading.Lock()
        self._replacements: queue.Queue[str | None] = queue.Queue()
        self._replacer: threading.Thread | None = None
        self._sequence = itertools.count()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start every worker and wait until each has warmed up; raise PoolStartError if not."""
        starting = [self._spawn() for _ in range(self.size)]
        failures = [message for w in starting if (message := self._await_ready(w)) is not None]
        if failures:
            for started in starting:
                started.kill()
            raise PoolStartError(f"verifier workers did not start: {failures[0]}")
        with self._lock:
            self._workers.update(starting)
        for started in starting:
            self._idle.put(started)
        self._replacer = threading.Thread(
            target=self._replace_forever, name="verifier-pool-replacer", daemon=True
        )
        self._replacer.start()

    def close(self) -> None:
        self._closed = True
        self._replacements.put(None)
        with self._lock:
            workers = list(self._workers)
            self._workers.clear()
        for each in workers:
            with contextlib.suppress(Exception):
                each.connection.send(None)
        for each in workers:
            each.process.join(timeout=0.5)
            each.kill()
        if self._replacer is not None:
            self._replacer.join(timeout=5.0)

    def __enter__(self) -> VerifierPool:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def alive(self) -> int:
        """Workers that are up (busy or idle)."""
        with self._lock:
            return len(self._workers)

    # -- workers -----------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=worker_module.worker_main,
            args=(child_end, self._settings_json, self._plugins, self._memory_mb),
            name="verifier-worker",
            daemon=True,
        )
        process.start()
        child_end.close()
        return _Worker(process, parent_end)

    def _await_ready(self, candidate: _Worker) -> str | None:
        """None when the worker reported ready, else why not."""
        try:
            if not candidate.connection.poll(self._start_timeout_s):
                return f"no ready signal within {self._start_timeout_s} s"
            message = candidate.connection.recv()
        except (EOFError, OSError):
            return "the worker exited during start (see its stderr)"
        if isinstance(message, tuple) and message[:1] == (worker_module.READY,):
            return None
        return str(message[1] if isinstance(message, tuple) and len(message) > 1 else message)

    def _retire(self, retired: _Worker, reason: str) -> None:
        retired.kill()
        with self._lock:
            self._workers.discard(retired)
        if self._closed:
            return
        if self._on_restart is not None:
            self._on_restart(reason)
        self._replacements.put(reason)

    def _replace_forever(self) -> None:
        while True:
            reason = self._replacements.get()
            if reason is None or self._closed:
                return
            delay = 0.5
            while not self._closed:
                fresh: _Worker | None = None
                try:
                    fresh = self._spawn()
                    failure = self._await_ready(fresh)
                except Exception as exc:  # a failed fork must not end the replacer
                    failure = str(exc)
                if failure is None and fresh is not None and not self._closed:
                    with self._lock:
                        self._workers.add(fresh)
                    self._idle.put(fresh)
                    break
                if fresh is not None:
                    fresh.kill()
                time.sleep(delay)
                delay = min(delay * 2, _MAX_RESPAWN_DELAY_S)

    def _take_idle(self, block: bool, timeout: float) -> _Worker | None:
        try:
            if block:
                return self._idle.get(timeout=max(timeout, 0.0))
            return self._idle.get_nowait()
        except queue.Empty:
            return None

    # -- work --------------------------------------------------------------------------------

    def run(
        self, requests: Sequence[AccuracyRequest], timeout_s: float, deadline_s: float
    ) -> list[AccuracyOutcome]:
        """Score every request; each gets at most `timeout_s` of a worker, all of them together
        at most `deadline_s`. Never raises for a bad sample: it becomes TIMEOUT or ERROR."""
        results: list[AccuracyOutcome | None] = [None] * len(requests)
        pending = collections.deque(range(len(requests)))
        running: dict[Connection, tuple[_Worker, int, int, float]] = {}
        deadline = time.monotonic() + deadline_s
        try:
            while (pending or running) and not self._closed:
                now = time.monotonic()
                if now >= deadline:
                    break
                while pending:
                    taken = self._take_idle(block=not running, timeout=deadline - now)
                    if taken is None:
                        break
                    index = pending.popleft()
                    sequence = next(self._sequence)
                    try:
                        taken.connection.send((sequence, requests[index]))
                    except Exception:  # the worker died while idle
                        pending.appendleft(index)
                        self._retire(taken, "crash")
                        continue
                    running[taken.connection] = (taken, index, sequence, time.monotonic())
                if running:
                    self._collect(results, running, pending, timeout_s, deadline)
        finally:
            for busy, index, _, _ in running.values():
                results[index] = AccuracyOutcome(
                    0.0, AccuracyStatus.TIMEOUT, detail="request deadline passed"
                )
                self._retire(busy, "deadline")
        unfinished = AccuracyOutcome(
            0.0,
            AccuracyStatus.ERROR if self._closed else AccuracyStatus.TIMEOUT,
            detail="the verifier is shutting down" if self._closed else "request deadline passed",
        )
        return [outcome or unfinished for outcome in results]

    def _collect(
        self,
        results: list[AccuracyOutcome | None],
        running: dict[Connection, tuple[_Worker, int, int, float]],
        pending: collections.deque[int],
        timeout_s: float,
        deadline: float,
    ) -> None:
        now = time.monotonic()
        first_expiry = min(started + timeout_s for _, _, _, started in running.values())
        wait_s = max(0.0, min(first_expiry, deadline) - now)
        if pending:
            wait_s = min(wait_s, _POLL_S)
        for ready in wait(list(running), timeout=wait_s):
            assert isinstance(ready, Connection)
            busy, index, sequence, _ = running.pop(ready)
            try:
                answered, outcome = ready.recv()
            except Exception:
                results[index] = AccuracyOutcome(
                    0.0, AccuracyStatus.ERROR, detail="verifier worker died"
                )
                self._retire(busy, "crash")
                continue
            if answered != sequence or not isinstance(outcome, AccuracyOutcome):
                results[index] = AccuracyOutcome(
                    0.0, AccuracyStatus.ERROR, detail="verifier worker answered out of turn"
                )
                self._retire(busy, "crash")
                continue
            results[index] = outcome
            self._idle.put(busy)
        now = time.monotonic()
        for connection, (busy, index, _, started) in list(running.items()):
            if now - started >= timeout_s:
                del running[connection]
                results[index] = AccuracyOutcome(
                    0.0, AccuracyStatus.TIMEOUT, detail=f"over the {timeout_s:g} s sample limit"
                )
                self._retire(busy, "timeout")
