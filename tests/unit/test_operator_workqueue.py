"""The operator's work queue, with real threads: one pass for a burst of events, never two
workers on one run, a change during a pass is not lost, and delayed retries."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from lmmr1_operator.workqueue import Key, WorkQueue


def until(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_burst_of_events_for_one_run_is_one_pass() -> None:
    gate = threading.Event()
    handled: list[Key] = []

    def handle(key: Key) -> None:
        gate.wait(10)
        handled.append(key)

    queue = WorkQueue(handle, workers=1)
    blocker = ("ns", "first")
    queue.start()
    queue.add(blocker)  # holds the only worker while the burst arrives
    until(lambda: queue.depth() == 0)
    for _ in range(50):
        queue.add(("ns", "r"))
    assert queue.depth() == 1
    gate.set()
    until(queue.idle)
    queue.shutdown(wait=5)
    assert handled == [blocker, ("ns", "r")]


def test_one_run_is_never_handled_by_two_workers_and_a_change_meanwhile_is_not_lost() -> None:
    inside: dict[Key, int] = {}
    most = 0
    passes: list[Key] = []
    lock = threading.Lock()
    release = threading.Event()

    def handle(key: Key) -> None:
        nonlocal most
        with lock:
            inside[key] = inside.get(key, 0) + 1
            most = max(most, inside[key])
        release.wait(10)
        with lock:
            inside[key] -= 1
            passes.append(key)

    queue = WorkQueue(handle, workers=4)
    queue.start()
    queue.add(("ns", "r"))
    until(lambda: inside.get(("ns", "r")) == 1)
    queue.add(("ns", "r"))  # changed while being handled: marked dirty, not run alongside
    queue.add(("ns", "other"))  # another run is handled at once by a free worker
    until(lambda: inside.get(("ns", "other")) == 1)
    assert inside[("ns", "r")] == 1
    release.set()
    until(queue.idle)
    queue.shutdown(wait=5)
    assert most == 1
    assert sorted(passes) == [("ns", "other"), ("ns", "r"), ("ns", "r")]


def test_add_after_queues_the_run_once_its_delay_is_over() -> None:
    seen: list[tuple[Key, float]] = []
    queue = WorkQueue(lambda key: seen.append((key, time.monotonic())), workers=2)
    queue.start()
    start = time.monotonic()
    queue.add_after(("ns", "late"), 0.3)
    queue.add_after(("ns", "soon"), 0.05)
    until(lambda: len(seen) == 2)
    queue.shutdown(wait=5)
    assert [key for key, _ in seen] == [("ns", "soon"), ("ns", "late")]
    assert seen[1][1] - start >= 0.3


def test_a_failing_handler_keeps_its_worker() -> None:
    calls: list[Key] = []

    def handle(key: Key) -> None:
        calls.append(key)
        if key[1] == "bad":
            raise RuntimeError("boom")

    waits: list[float] = []
    queue = WorkQueue(handle, workers=1, on_wait=waits.append)
    queue.start()
    queue.add(("ns", "bad"))
    queue.add(("ns", "good"))
    until(lambda: len(calls) == 2)
    queue.shutdown(wait=5)
    assert calls == [("ns", "bad"), ("ns", "good")] and len(waits) == 2


def test_a_run_waits_for_its_earliest_due_time_only() -> None:
    seen: list[Key] = []
    queue = WorkQueue(seen.append, workers=1)
    queue.start()
    for _ in range(1000):  # a pass a second, each asking again about a deadline far off
        queue.add_after(("ns", "r"), 3600)
    queue.add_after(("ns", "r"), 0.05)  # then something sooner
    assert queue.delayed() == 1
    until(lambda: seen == [("ns", "r")])
    assert queue.delayed() == 0
    queue.shutdown(wait=5)


def test_a_key_added_while_a_delay_is_pending_reaches_a_worker_at_once() -> None:
    """A new key must wake a worker, not the thread that waits for delayed keys (with one
    condition for both, `notify()` could wake the wrong one and the key waited)."""
    seen: list[Key] = []
    queue = WorkQueue(seen.append, workers=1)
    queue.start()
    time.sleep(0.05)  # the worker and the timer both waiting
    queue.add_after(("ns", "later"), 3600)
    for i in range(20):
        time.sleep(0.01)
        queue.add(("ns", f"now-{i}"))
        until(lambda i=i: ("ns", f"now-{i}") in seen, timeout=2)
    queue.shutdown(wait=5)
