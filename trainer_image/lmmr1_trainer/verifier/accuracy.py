"""The paper's accuracy reward with math-verify, and a numeric variant with a tolerance.

`math` (LMM-R1 reference configuration):
- the label becomes LaTeX math (`AccuracySettings.label_wrapping`): `reference` wraps it in
  `$…$` unless it starts with `$` (as is: `$5` stays unclosed and does not parse);
  `delimiters` strips it and wraps it unless already delimited (`$…$`, `\\(`, `\\[`).
  Then it is parsed with `LatexExtractionConfig()`; nothing parsed, or its parse timing out
  (the reference's `parse` returns nothing then) → `label_unparseable`;
- the answer is read from the text chosen by `AccuracySettings.answer_source` with LaTeX
  extraction, `\\boxed{}` first (`boxed_match_priority=0`), no malformed operators, and
  only anchored expressions (`try_extract_without_anchor=False`); several `\\boxed{}` are
  read together as a set, so hedging (`\\boxed{1}\\boxed{2}`) does not match `1`;
- `answer_block` mode only: when that finds nothing in an `<answer>` block, the whole block
  (at most `max_bare_answer_chars`) is read as one bare LaTeX expression, like the label;
- math-verify's `verify` decides, every (label, answer) pair, with the arguments in
  `AccuracySettings.verify_order`: `answer_first` is the reference's `verify(answer, gold)`,
  `gold_first` math-verify's documented `verify(gold, answer)`. It is not symmetric.

`numeric`: `math` first; when it says no, any pair of numeric values (gold, answer) within
`numeric_rel_tol` / `numeric_abs_tol` (math.isclose) matches.

math-verify's timeouts use `signal.alarm`: they are on only in a main thread (the pool's
workers); elsewhere (inline use from a thread) they are off and the caller bounds the time.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from itertools import product
from typing import Any

from latex2sympy2_extended import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

from lmmr1_trainer.verifier.config import AccuracySettings, LabelWrapping, VerifyOrder
from lmmr1_trainer.verifier.rewards import (
    AccuracyOutcome,
    AccuracyRequest,
    AccuracyStatus,
    register_verifier,
)

_EXTRACTED_PREVIEW_CHARS = 200

_LABEL_CONFIG = (LatexExtractionConfig(),)
_ANSWER_NORMALIZATION = NormalizationConfig(
    nits=False,
    malformed_operators=False,
    basic_latex=True,
    boxed="all",
    units=True,
)
_ANSWER_CONFIG = (
    LatexExtractionConfig(
        normalization_config=_ANSWER_NORMALIZATION,
        boxed_match_priority=0,
        try_extract_without_anchor=False,
    ),
)
_BARE_ANSWER_CONFIG = (
    LatexExtractionConfig(
        normalization_config=_ANSWER_NORMALIZATION,
        boxed_match_priority=0,
        try_extract_without_anchor=True,
    ),
)


def wrap_label(label: str, wrapping: LabelWrapping) -> str:
    """The label as LaTeX math (see the module docstring for the two ways)."""
    if wrapping is LabelWrapping.REFERENCE:
        return label if label.startswith("$") else f"${label}$"
    text = label.strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        return text
    if text.startswith(("\\(", "\\[")):
        return text
    return f"${text}$"


def _signal_timeout(settings: AccuracySettings) -> int | None:
    # signal.alarm only works in the main thread; elsewhere math-verify would raise.
    if threading.current_thread() is threading.main_thread():
        return settings.math_timeout_s
    return None


def _preview(parsed: Sequence[Any]) -> str | None:
    # Use math-verify's own extracted string: str() of a huge sympy object can hang.
    for item in reversed(parsed):
        if isinstance(item, str):
            return item[:_EXTRACTED_PREVIEW_CHARS]
    return None


def _parse(text: str, config: tuple[LatexExtractionConfig, ...], timeout: int | None) -> list[Any]:
    """math-verify's parse; its timeout propagates, any other failure means "nothing"."""
    try:
        return list(
            parse(
                text,
                extraction_config=config,
                extraction_mode="first_match",
                parsing_timeout=timeout,
                raise_on_error=True,
            )
        )
    except TimeoutException:
        raise
    except Exception:
        return []


def parse_label(label: str, settings: AccuracySettings) -> list[Any]:
    wrapped = wrap_label(label, settings.label_wrapping)
    return _parse(wrapped, _LABEL_CONFIG, _signal_timeout(settings))


def parse_answer(request: AccuracyRequest, settings: AccuracySettings) -> list[Any]:
    timeout = _signal_timeout(settings)
    parsed = _parse(request.text, _ANSWER_CONFIG, timeout)
    bare = request.text.strip()
    if parsed or not request.from_answer_block or not bare:
        return parsed
    if len(bare) > settings.max_bare_answer_chars:
        return parsed
    return _parse(wrap_label(bare, LabelWrapping.DELIMITERS), _BARE_ANSWER_CONFIG, timeout)


def _equal(gold: list[Any], answer: list[Any], settings: AccuracySettings) -> bool:
    """`verify` pair by pair in `settings.verify_order`, like math-verify over the lists,
    except that a pair that times out raises TimeoutException when no other pair matched (so
    the sample is flagged; the score is 0 either way)."""
    first, second = (answer, gold)
    if settings.verify_order is VerifyOrder.GOLD_FIRST:
        first, second = gold, answer
    timed_out: TimeoutException | None = None
    for left, right in product(first, second):
        try:
            if verify(
                left,
                right,
                float_rounding=settings.float_rounding,
                timeout_seconds=_signal_timeout(settings),
                raise_on_error=True,
            ):
                return True
        except TimeoutException as exc:
            timed_out = exc
        except Exception:
            continue
    if timed_out is not None:
        raise timed_out
    return False


def _parse_both(
    request: AccuracyRequest, settings: AccuracySettings
) -> tuple[list[Any], list[Any]] | AccuracyOutcome:
    if request.label is None:
        return AccuracyOutcome(0.0, AccuracyStatus.LABEL_UNPARSEABLE, detail="no label")
    try:
        gold = parse_label(request.label, settings)
    except TimeoutException:
        return AccuracyOutcome(
            0.0, AccuracyStatus.LABEL_UNPARSEABLE, detail="math-verify timeout (label parse)"
        )
    if not gold:
        return AccuracyOutcome(0.0, AccuracyStatus.LABEL_UNPARSEABLE)
    answer = parse_answer(request, settings)
    if not answer:
        return AccuracyOutcome(0.0, AccuracyStatus.NO_ANSWER)
    return gold, answer


def _timed_out(stage: str) -> AccuracyOutcome:
    return AccuracyOutcome(0.0, AccuracyStatus.TIMEOUT, detail=f"math-verify timeout ({stage})")


def _compare(
    request: AccuracyRequest, settings: AccuracySettings
) -> tuple[AccuracyOutcome, list[Any], list[Any]]:
    """The math outcome, with the parsed label and answer (empty when not reached)."""
    try:
        parsed = _parse_both(request, settings)
    except TimeoutException:
        return _timed_out("parse"), [], []
    if isinstance(parsed, AccuracyOutcome):
        return parsed, [], []
    gold, answer = parsed
    try:
        equal = _equal(gold, answer, settings)
    except TimeoutException:
        return _timed_out("compare"), gold, answer
    outcome = AccuracyOutcome(1.0 if equal else 0.0, AccuracyStatus.OK, extracted=_preview(answer))
    return outcome, gold, answer


@register_verifier("math")
def math_accuracy(request: AccuracyRequest, settings: AccuracySettings) -> AccuracyOutcome:
    """1.0 when math-verify finds the answer equal to the label."""
    return _compare(request, settings)[0]


def _numeric_values(parsed: Sequence[Any]) -> list[float]:
    values = []
    for item in parsed:
        if isinstance(item, str) or not getattr(item, "is_number", False):
            continue
        try:
            value = complex(item.evalf())
        except (TypeError, ValueError, OverflowError, ArithmeticError):
            continue
        if value.imag == 0 and math.isfinite(value.real):
            values.append(value.real)
    return values


@register_verifier("numeric")
def numeric_accuracy(request: AccuracyRequest, settings: AccuracySettings) -> AccuracyOutcome:
    """`math`, or numerically close within the configured tolerances."""
    exact, gold, answer = _compare(request, settings)
    if exact.status is not AccuracyStatus.OK or exact.score == 1.0:
        return exact
    for expected in _numeric_values(gold):
        for got in _numeric_values(answer):
            if math.isclose(
                got, expected, rel_tol=settings.numeric_rel_tol, abs_tol=settings.numeric_abs_tol
            ):
                return AccuracyOutcome(1.0, AccuracyStatus.OK, extracted=exact.extracted)
    return exact
