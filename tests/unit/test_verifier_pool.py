"""The worker pool: per-sample wall-clock limits, hung and crashed workers, pathological input.

Real worker processes (2, small limits so the whole file runs in well under a minute).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from test_verifier_plugins import PLUGIN_MODULE

from lmmr1_trainer.verifier.config import AccuracySettings, VerifierConfig
from lmmr1_trainer.verifier.engine import Sample, Verifier
from lmmr1_trainer.verifier.pool import PoolStartError, VerifierPool

MATH_TIMEOUT_S = 1
SAMPLE_TIMEOUT_S = 2.5
WORKERS = 2


def _config(**limits: float) -> VerifierConfig:
    return VerifierConfig.model_validate(
        {
            "pool": {"workers": WORKERS},
            "plugins": [PLUGIN_MODULE],
            "accuracy": {"math_timeout_s": MATH_TIMEOUT_S},
            "limits": {
                "sample_timeout_s": SAMPLE_TIMEOUT_S,
                "request_deadline_s": 60,
                "max_response_chars": 200_000,
                **limits,
            },
        }
    )


@pytest.fixture(scope="module")
def verifier() -> Iterator[Verifier]:
    with Verifier(_config()) as started:
        yield started


def _wait_for_workers(verifier: Verifier, count: int = WORKERS, within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    while verifier.workers_alive() < count:
        assert time.monotonic() < deadline, "the pool did not replace its workers"
        time.sleep(0.05)


def W(answer: str) -> str:
    return f"<think>t</think><answer>{answer}</answer>"


def test_a_hung_sample_times_out_without_losing_the_batch(verifier: Verifier) -> None:
    _wait_for_workers(verifier)
    batch = [Sample(W(r"\boxed{1}"), "1"), Sample("x", None, task="test-hang")]
    batch += [Sample(W(rf"\boxed{{{n}}}"), str(n)) for n in range(2, 8)]
    started = time.monotonic()
    results = verifier.score(batch)
    elapsed = time.monotonic() - started
    hung = results[1]
    assert (hung.accuracy_score, hung.status, hung.skip) == (0.0, "timeout", True)
    assert "timeout" in hung.flags
    assert [r.reward for i, r in enumerate(results) if i != 1] == [1.5] * 7
    assert elapsed < SAMPLE_TIMEOUT_S + 2.0
    _wait_for_workers(verifier)
    [again] = verifier.score([Sample(W(r"\boxed{9}"), "9")])
    assert again.reward == 1.5


def test_a_crashed_worker_is_replaced(verifier: Verifier) -> None:
    _wait_for_workers(verifier)
    crash = Sample("x", "1", task="test-crash")
    results = verifier.score([crash, Sample(W(r"\boxed{2}"), "2"), Sample(W(r"\boxed{B}"), "B")])
    assert (results[0].accuracy_score, results[0].status) == (0.0, "error")
    assert results[0].detail == "verifier worker died"
    assert [r.reward for r in results[1:]] == [1.5, 1.5]
    _wait_for_workers(verifier)


# Inputs that make LaTeX parsing or sympy slow, huge, or deep. Each must come back within
# the per-sample limit as a 0, flagged `timeout` when a limit stopped it.
PATHOLOGICAL = {
    "100kB-prose-then-box": ("a " * 50_000 + r"\boxed{1}", "1", 1.0),
    "100kB-answer-block": (W(r"\boxed{" + "1+" * 50_000 + "1}"), "50001", 0.0),
    "deep-frac": (W(r"\boxed{" + r"\frac{1}{" * 300 + "2" + "}" * 301), "1", 0.0),
    "deep-parens": (W(r"\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}"), "1", 0.0),
    "deep-sqrt": (W(r"\boxed{" + r"\sqrt{" * 500 + "2" + "}" * 501), "2", 0.0),
    "power-tower": (W(r"\boxed{9^{9^{9^{9}}}}"), "1", 0.0),
    "huge-power": (W(r"\boxed{10^{10^{10}}}"), "10", 0.0),
    "huge-factorial": (W(r"\boxed{100000000!}"), "1", 0.0),
    "expand-200": (W(r"\boxed{(x+1)^{200}}"), "(x+2)^{200}", 0.0),
    "many-boxes": (W(r"\boxed{1}" * 5000), "2", 0.0),
    "unbalanced": (W(r"\boxed{\frac{1}{" * 2000), "1", 0.0),
}


def test_pathological_inputs_return_within_the_limit(verifier: Verifier) -> None:
    _wait_for_workers(verifier)
    names = list(PATHOLOGICAL)
    samples = [Sample(PATHOLOGICAL[n][0], PATHOLOGICAL[n][1]) for n in names]
    started = time.monotonic()
    results = verifier.score(samples)
    elapsed = time.monotonic() - started
    for name, result in zip(names, results, strict=True):
        assert result.accuracy_score == PATHOLOGICAL[name][2], (name, result)
        assert result.status in {"ok", "timeout", "no_answer"}, (name, result)
    # Every sample is bounded by SAMPLE_TIMEOUT_S; two workers share the batch.
    bound = SAMPLE_TIMEOUT_S * -(-len(samples) // WORKERS) + 2.0
    assert elapsed < bound, f"{elapsed:.1f} s for {len(samples)} samples"
    _wait_for_workers(verifier)


def test_too_long_responses_score_zero_at_once() -> None:
    with Verifier(_config(max_response_chars=1000)) as small:
        started = time.monotonic()
        [result] = small.score([Sample(W(r"\boxed{1}" + "x" * 100_000), "1")])
    assert time.monotonic() - started < 1.0
    assert (result.reward, result.status) == (0.0, "response_too_long")
    assert not result.skip


def test_the_request_deadline_bounds_a_whole_batch() -> None:
    config = _config(sample_timeout_s=2.0, request_deadline_s=3.0)
    with Verifier(config) as verifier:
        started = time.monotonic()
        results = verifier.score([Sample("x", str(30 + n), task="test-hang") for n in range(6)])
        elapsed = time.monotonic() - started
    assert 3.0 <= elapsed < 4.5
    assert {r.status for r in results} == {"timeout"}
    assert {r.detail for r in results} == {
        "over the 2 s sample limit",
        "request deadline passed",
    }
    assert all(r.reward == 0.0 for r in results)


def test_concurrent_batches_share_the_workers(verifier: Verifier) -> None:
    _wait_for_workers(verifier)
    rewards: dict[int, list[float]] = {}

    def score(thread: int) -> None:
        batch = [
            Sample(W(rf"\boxed{{{thread * 100 + n}}}"), str(thread * 100 + n)) for n in range(8)
        ]
        rewards[thread] = [r.reward for r in verifier.score(batch)]

    threads = [threading.Thread(target=score, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert rewards == {t: [1.5] * 8 for t in range(4)}


def test_a_worker_that_cannot_import_its_plugin_stops_the_start() -> None:
    pool = VerifierPool(1, AccuracySettings(), plugins=("no_such_verifier_plugin",))
    with pytest.raises(PoolStartError, match="no_such_verifier_plugin"):
        pool.start()


def test_closing_the_pool_stops_its_workers() -> None:
    pool = VerifierPool(2, AccuracySettings())
    pool.start()
    assert pool.alive() == 2
    pool.close()
    assert pool.alive() == 0
