"""Named, weighted rewards; the registry of accuracy verifiers; the unparseable-label policy.

A sample's reward is `format.weight * format_score + accuracy.weight * accuracy_score`
(the paper: 0.5 and 1.0). The format score is computed in the server process (cheap string
checks); the accuracy score comes from a verifier chosen by task name, run in a worker
process. Task-specific verifiers (agent tasks, …) plug in with `register_verifier` in a
module listed in `VerifierConfig.plugins`; it is imported by the server and every worker.
A task with an answer format of its own (the built-in `sokoban`) registers with
`owns_format=True`: it scores the format itself (`AccuracyOutcome.format_score`, weighted by
the format weight) and reads the whole response; with `bounded=False` its score is a task
reward (any finite number, e.g. an environment's return) instead of an accuracy in [0, 1].

This module is pure: it imports neither math-verify nor anything heavy.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TypeVar

from lmmr1_trainer.verifier.config import AccuracySettings, FormatRule, UnparseableLabelPolicy
from lmmr1_trainer.verifier.format import format_score

BUILTIN_VERIFIER_MODULES = (
    "lmmr1_trainer.verifier.accuracy",
    "lmmr1_trainer.verifier.choice",
    "lmmr1_trainer.verifier.sokoban",
)
AUTO_TASK = "auto"


class AccuracyStatus(StrEnum):
    """Why an accuracy score is what it is."""

    OK = "ok"  # the answer was compared with the label; the score says whether it matched
    NO_ANSWER = "no_answer"  # nothing could be extracted from the response
    LABEL_UNPARSEABLE = "label_unparseable"  # the policy decides the score
    TIMEOUT = "timeout"  # ran past the per-sample or per-request limit: 0
    ERROR = "error"  # the verifier raised or its worker died: 0
    RESPONSE_TOO_LONG = "response_too_long"  # over limits.max_response_chars: 0


# Statuses where the score does not measure the model: a trainer may drop such samples.
SKIP_STATUSES = frozenset(
    {AccuracyStatus.LABEL_UNPARSEABLE, AccuracyStatus.TIMEOUT, AccuracyStatus.ERROR}
)


@dataclass(frozen=True)
class AccuracyRequest:
    """What a verifier needs: the text to read, the label, and where the text came from."""

    task: str
    text: str
    label: str | None
    from_answer_block: bool = False


@dataclass(frozen=True)
class AccuracyOutcome:
    score: float
    status: AccuracyStatus
    extracted: str | None = None  # the answer as read from the response, for inspection
    detail: str | None = None  # a short reason for errors and timeouts
    # Set by verifiers that own the format (`VerifierTraits.owns_format`): 1.0 or 0.0.
    format_score: float | None = None


class AccuracyVerifier(Protocol):
    def __call__(self, request: AccuracyRequest, settings: AccuracySettings) -> AccuracyOutcome:
        """Score one sample. Must be deterministic and side-effect free."""
        ...


@dataclass(frozen=True)
class VerifierTraits:
    """How the engine treats a verifier (see the module docstring)."""

    owns_format: bool = False  # it sets `format_score` and reads the whole response
    bounded: bool = True  # its score is in [0, 1]; False: any finite number


_VerifierT = TypeVar("_VerifierT", bound=AccuracyVerifier)
_REGISTRY: dict[str, AccuracyVerifier] = {}
_TRAITS: dict[str, VerifierTraits] = {}


class UnknownTaskError(KeyError):
    """A task name no verifier is registered under."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_verifier(
    name: str, *, owns_format: bool = False, bounded: bool = True
) -> Callable[[_VerifierT], _VerifierT]:
    """Decorator: register an accuracy verifier under a task name (e.g. "choice")."""
    if not name or name == AUTO_TASK:
        raise ValueError(f"invalid verifier name {name!r}")

    def decorate(verifier: _VerifierT) -> _VerifierT:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not verifier:
            raise ValueError(f"a verifier is already registered as {name!r}")
        _REGISTRY[name] = verifier
        _TRAITS[name] = VerifierTraits(owns_format=owns_format, bounded=bounded)
        return verifier

    return decorate


def get_verifier(name: str) -> AccuracyVerifier:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UnknownTaskError(f"unknown task {name!r}; registered: {known}, or auto") from None


def verifier_traits(name: str) -> VerifierTraits:
    """The traits a task's verifier registered with (the defaults for an unknown task)."""
    return _TRAITS.get(name, VerifierTraits())


def registered_tasks() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def load_verifiers(plugins: Iterable[str] = ()) -> None:
    """Import the built-in verifiers and the plug-in modules (which register themselves)."""
    for module in (*BUILTIN_VERIFIER_MODULES, *plugins):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(f"cannot import verifier plug-in {module!r}: {exc}") from exc


def run_verification(request: AccuracyRequest, settings: AccuracySettings) -> AccuracyOutcome:
    """Run the request's verifier; any exception becomes an ERROR outcome (score 0)."""
    try:
        verifier = get_verifier(request.task)
    except UnknownTaskError as exc:
        return AccuracyOutcome(0.0, AccuracyStatus.ERROR, detail=str(exc))
    try:
        outcome = verifier(request, settings)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # math-verify's TimeoutException is a BaseException
        return AccuracyOutcome(0.0, AccuracyStatus.ERROR, detail=f"{type(exc).__name__}")
    traits = verifier_traits(request.task)
    if traits.bounded and not 0.0 <= outcome.score <= 1.0:
        return AccuracyOutcome(0.0, AccuracyStatus.ERROR, detail="score outside [0, 1]")
    if not math.isfinite(outcome.score):
        return AccuracyOutcome(0.0, AccuracyStatus.ERROR, detail="score not finite")
    if outcome.format_score is not None and not 0.0 <= outcome.format_score <= 1.0:
        return AccuracyOutcome(0.0, AccuracyStatus.ERROR, detail="format score outside [0, 1]")
    return outcome


@dataclass(frozen=True)
class FormatReward:
    """The paper's format reward: 1.0 times its weight when the response is well formed."""

    weight: float
    rule: FormatRule = FormatRule.REFERENCE
    allow_whitespace_between_blocks: bool = False
    name: str = "format"

    def score(self, response: str) -> float:
        return format_score(
            response,
            rule=self.rule,
            allow_whitespace_between_blocks=self.allow_whitespace_between_blocks,
        )


@dataclass(frozen=True)
class AccuracyReward:
    """The paper's accuracy reward, with the explicit policy for unparseable labels."""

    weight: float
    unparseable_label_policy: UnparseableLabelPolicy = UnparseableLabelPolicy.ONE
    name: str = "accuracy"

    def score(self, outcome: AccuracyOutcome) -> float:
        if outcome.status is AccuracyStatus.LABEL_UNPARSEABLE:
            return 1.0 if self.unparseable_label_policy is UnparseableLabelPolicy.ONE else 0.0
        if outcome.status is AccuracyStatus.OK:
            return outcome.score
        return 0.0


@dataclass(frozen=True)
class SampleResult:
    """One sample's rewards: weighted components, raw scores, and why."""

    reward: float
    format_reward: float  # weighted
    accuracy_reward: float  # weighted
    format_score: float  # raw, 0 or 1
    accuracy_score: float  # raw, after the unparseable-label policy
    task: str
    status: AccuracyStatus
    flags: tuple[str, ...]
    extracted_answer: str | None
    detail: str | None

    @property
    def skip(self) -> bool:
        return self.status in SKIP_STATUSES


def combine(
    format_reward: FormatReward,
    accuracy_reward: AccuracyReward,
    format_raw: float,
    outcome: AccuracyOutcome,
    task: str,
    extra_flags: Iterable[str] = (),
) -> SampleResult:
    """Weight and sum the two rewards; flag every non-OK status."""
    accuracy_raw = accuracy_reward.score(outcome)
    weighted_format = format_reward.weight * format_raw
    weighted_accuracy = accuracy_reward.weight * accuracy_raw
    flags = list(extra_flags)
    if outcome.status is not AccuracyStatus.OK:
        flags.append(outcome.status.value)
    return SampleResult(
        reward=weighted_format + weighted_accuracy,
        format_reward=weighted_format,
        accuracy_reward=weighted_accuracy,
        format_score=format_raw,
        accuracy_score=accuracy_raw,
        task=task,
        status=outcome.status,
        flags=tuple(flags),
        extracted_answer=outcome.extracted,
        detail=outcome.detail,
    )
