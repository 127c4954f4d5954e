"""Plug-in verifiers used by the pool and service tests, and tests of the plug-in registry.

This module is itself a verifier plug-in: listed in `VerifierConfig.plugins` as
`test_verifier_plugins` (pytest puts tests/unit on sys.path; the service test adds it to
PYTHONPATH), it is imported by the server and every worker and registers the verifiers
below. They misbehave on purpose: hang with SIGALRM blocked (as C code that never returns
to the interpreter does), kill their own process, raise.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from lmmr1_trainer.verifier.config import AccuracySettings, PoolSettings, VerifierConfig
from lmmr1_trainer.verifier.engine import Sample, Verifier
from lmmr1_trainer.verifier.rewards import (
    AccuracyOutcome,
    AccuracyRequest,
    AccuracyStatus,
    UnknownTaskError,
    get_verifier,
    register_verifier,
    registered_tasks,
)

PLUGIN_MODULE = __name__
CALLS: list[str] = []


@register_verifier("test-exact")
def exact_text(request: AccuracyRequest, settings: AccuracySettings) -> AccuracyOutcome:
    """A task-specific verifier in miniature (a Sokoban verifier has the same shape)."""
    CALLS.append(request.text)
    if request.label is None:
        return AccuracyOutcome(0.0, AccuracyStatus.LABEL_UNPARSEABLE)
    matched = request.text.strip() == request.label.strip()
    return AccuracyOutcome(1.0 if matched else 0.0, AccuracyStatus.OK, extracted=request.text)


@register_verifier("test-hang")
def hang(request: AccuracyRequest, settings: AccuracySettings) -> AccuracyOutcome:
    """Sleeps for `label` seconds (default 600) where no alarm can interrupt it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(float(request.label or 600))
    return AccuracyOutcome(1.0, AccuracyStatus.OK)


@register_verifier("test-crash")
def crash(request: AccuracyRequest, settings: AccuracySettings) -> AccuracyOutcome:
    """Dies like a segfaulting or OOM-killed process."""
    os.kill(os.getpid(), signal.SIGKILL)
    return AccuracyOutcome(1.0, AccuracyStatus.OK)  # pragma: no cover


@register_verifier("test-raise")
def raise_error(request: AccuracyRequest, settings: AccuracySettings) -> AccuracyOutcome:
    raise RuntimeError("a verifier bug")


@register_verifier("test-bad-score")
def bad_score(request: AccuracyRequest, settings: AccuracySettings) -> AccuracyOutcome:
    return AccuracyOutcome(7.0, AccuracyStatus.OK)


@register_verifier("test-task-reward", owns_format=True, bounded=False)
def task_reward(request: AccuracyRequest, settings: AccuracySettings) -> AccuracyOutcome:
    """A task reward (any finite number, the label's) with a format rule of its own."""
    formatted = 1.0 if request.text.startswith("ok") else 0.0
    return AccuracyOutcome(float(request.label or 0), AccuracyStatus.OK, format_score=formatted)


def _inline(**overrides: object) -> Verifier:
    return Verifier(
        VerifierConfig.model_validate(
            {"pool": {"workers": 0}, "plugins": [PLUGIN_MODULE], **overrides}
        )
    )


def test_plugins_register_under_their_task_names() -> None:
    assert {"math", "choice", "numeric", "test-exact", "test-hang"} <= set(registered_tasks())
    assert get_verifier("test-exact") is exact_text


def test_a_name_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_verifier("math")(exact_text)
    with pytest.raises(ValueError, match="invalid verifier name"):
        register_verifier("auto")


def test_unknown_task_names_the_registered_ones() -> None:
    with pytest.raises(UnknownTaskError, match=r"registered: .*choice.*math"):
        get_verifier("tetris")


def test_a_plugin_task_scores_through_the_engine() -> None:
    verifier = _inline(profile="lenient")  # the plug-in gets the <answer> block's text
    results = verifier.score(
        [
            Sample("<think>t</think><answer>UDLR</answer>", "UDLR", task="test-exact"),
            Sample("<think>t</think><answer>UD</answer>", "UDLR", task="test-exact"),
        ]
    )
    assert [r.reward for r in results] == [1.5, 0.5]
    assert [r.task for r in results] == ["test-exact", "test-exact"]


def test_a_plugin_can_be_the_default_task() -> None:
    verifier = _inline(profile="lenient", accuracy={"default_task": "test-exact"})
    [result] = verifier.score([Sample("<think>t</think><answer>x</answer>", "x")])
    assert (result.task, result.accuracy_score) == ("test-exact", 1.0)


def test_an_unknown_default_task_is_refused_at_start() -> None:
    with pytest.raises(UnknownTaskError, match="tetris"):
        _inline(accuracy={"default_task": "tetris"})


def test_a_missing_plugin_module_is_a_clear_error() -> None:
    config = VerifierConfig(pool=PoolSettings(workers=0), plugins=("no_such_verifier_plugin",))
    with pytest.raises(ImportError, match="no_such_verifier_plugin"):
        Verifier(config)


def test_a_raising_verifier_scores_zero_and_is_flagged() -> None:
    [raised, out_of_range] = _inline().score(
        [Sample("x", "1", task="test-raise"), Sample("x", "1", task="test-bad-score")]
    )
    assert (raised.accuracy_score, raised.status, raised.detail) == (0.0, "error", "RuntimeError")
    assert raised.skip and "error" in raised.flags
    assert (out_of_range.accuracy_score, out_of_range.status) == (0.0, "error")


def test_identical_answers_in_a_batch_are_verified_once() -> None:
    CALLS.clear()
    batch = [Sample("<think>t</think><answer>a</answer>", "a", task="test-exact")] * 16
    batch += [Sample("<think>u</think><answer>b</answer>", "a", task="test-exact")] * 16
    results = _inline(profile="lenient").score(batch)
    assert [r.reward for r in results] == [1.5] * 16 + [0.5] * 16
    assert sorted(CALLS) == ["a", "b"]


def test_a_task_reward_is_any_finite_number_and_its_format_its_own() -> None:
    [big, negative, nan, formatted] = _inline(profile="lenient").score(
        [
            Sample("x", "12.5", task="test-task-reward"),
            Sample("x", "-3", task="test-task-reward"),
            Sample("x", "nan", task="test-task-reward"),
            # Well formed by the paper's rule, but this task's rule decides: 0.
            Sample("<think>t</think><answer>1</answer>", "2", task="test-task-reward"),
        ]
    )
    assert (big.reward, big.format_reward, negative.reward) == (12.5, 0.0, -3.0)
    assert (nan.reward, nan.status, nan.detail) == (0.0, "error", "score not finite")
    assert (formatted.format_score, formatted.reward) == (0.0, 2.0)
    [own_format] = _inline().score([Sample("ok, not tagged", "1", task="test-task-reward")])
    assert (own_format.format_reward, own_format.reward) == (0.5, 1.5)
