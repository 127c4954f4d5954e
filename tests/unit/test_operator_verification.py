"""Final-checkpoint checks run off the reconcile path (`lmmr1_operator.verification`), with
real threads: a check that hangs holds up nobody else, a verdict reconciles its run again,
and a failed check is shown, then tried again."""

from __future__ import annotations

import threading

from lmmr1_operator.verification import CheckpointVerifier


class Requeued:
    def __init__(self) -> None:
        self.runs: list[tuple[str, str]] = []
        self.event = threading.Event()

    def __call__(self, namespace: str, name: str) -> None:
        self.runs.append((namespace, name))
        self.event.set()

    def wait(self) -> None:
        assert self.event.wait(30), "no verdict came back"
        self.event.clear()


def test_a_verdict_comes_back_through_a_new_reconcile_of_its_run() -> None:
    requeued = Requeued()
    verifier = CheckpointVerifier(requeued)
    run = ("ns", "r", "uid-1")
    assert verifier.verdict(run, "s3://b/ns/r/uid-1/fre/step-4", lambda: True) is None
    requeued.wait()
    assert requeued.runs == [("ns", "r")]
    found = verifier.verdict(run, "s3://b/ns/r/uid-1/fre/step-4", lambda: False)
    assert found is not None and found.committed is True  # asked once, remembered
    verifier.forget("ns", "r")
    assert verifier.verdict(run, "s3://b/ns/r/uid-1/fre/step-4", lambda: False) is None
    verifier.shutdown()


def test_a_check_that_hangs_holds_up_no_other_run() -> None:
    requeued = Requeued()
    verifier = CheckpointVerifier(requeued, workers=2)
    release = threading.Event()

    def hangs() -> bool:
        release.wait(60)  # an S3 endpoint that never answers, until the test lets it go
        return True

    assert verifier.verdict(("ns", "slow", "u1"), "s3://slow/x", hangs) is None
    assert verifier.verdict(("ns", "slow", "u1"), "s3://slow/x", hangs) is None  # not twice
    assert verifier.pending() == 1
    assert verifier.verdict(("ns", "quick", "u2"), "s3://quick/x", lambda: True) is None
    requeued.wait()
    quick = verifier.verdict(("ns", "quick", "u2"), "s3://quick/x", lambda: True)
    assert quick is not None and quick.committed is True
    assert requeued.runs == [("ns", "quick")] and verifier.pending() == 1
    release.set()
    requeued.wait()
    assert requeued.runs == [("ns", "quick"), ("ns", "slow")]
    verifier.shutdown()


def test_a_failed_check_is_kept_for_a_while_then_tried_again() -> None:
    requeued = Requeued()
    calls: list[int] = []

    def unreachable() -> bool:
        calls.append(1)
        raise ConnectionError("Connect timeout on endpoint URL: http://10.0.0.9:9000")

    held = CheckpointVerifier(requeued, retry_after_s=3600)
    assert held.verdict(("ns", "r", "u"), "s3://b/x", unreachable) is None
    requeued.wait()
    failed = held.verdict(("ns", "r", "u"), "s3://b/x", unreachable)
    assert failed is not None and failed.committed is None
    assert failed.error == "ConnectionError: Connect timeout on endpoint URL: http://10.0.0.9:9000"
    assert held.verdict(("ns", "r", "u"), "s3://b/x", unreachable) is failed and calls == [1]
    held.shutdown()

    retried = CheckpointVerifier(requeued, retry_after_s=0)
    assert retried.verdict(("ns", "r", "u"), "s3://b/x", unreachable) is None
    requeued.wait()
    assert retried.verdict(("ns", "r", "u"), "s3://b/x", lambda: True) is None  # tried again
    requeued.wait()
    found = retried.verdict(("ns", "r", "u"), "s3://b/x", unreachable)
    assert found is not None and found.committed is True and calls == [1, 1]
    retried.shutdown()
