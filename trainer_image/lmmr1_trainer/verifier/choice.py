"""Multiple-choice answers: letters such as `B`, `(B)`, `\\text{B}`, `B. 42`, or `A, C`.

Label: after removing `$`, `\\text{}`-style wrappers and brackets, a single letter (any case)
or several uppercase letters (`A, C`, `AC`) for multi-select questions; anything else is
`label_unparseable`.
Answer: read from the same text as the math reward (the `<answer>` block, else the whole
response), preferring the last `\\boxed{}`; accepted forms are the same as for labels, a
letter followed by `.`/`)`/`:` and option text (`B. 42`, `(B) 42`), or a trailing
"answer is B" / "answer: B". The sets of letters must be equal (no credit for hedging).

`auto` routes a sample here when its label is one uppercase letter (`B`, `(B)`, `\\text{B}`).
"""

from __future__ import annotations

import re

from lmmr1_trainer.verifier.config import AccuracySettings
from lmmr1_trainer.verifier.rewards import (
    AccuracyOutcome,
    AccuracyRequest,
    AccuracyStatus,
    register_verifier,
)

_MAX_CHOICE_TEXT = 4096
_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|boxed|fbox)\s*\{([^{}]*)\}")
_SINGLE_LETTER = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:]?")
_UPPER_LETTERS = re.compile(r"[A-Z](?:\s*(?:,|;|/|&|and)?\s*[A-Z])*")
_LEADING_OPTION = re.compile(r"(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.):])(?:\s|$)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*[(\[]?([A-Z])\b[)\]]?", re.IGNORECASE)


def _unwrap(text: str) -> str:
    text = text.replace("$", "").strip()
    for _ in range(8):  # nested wrappers such as \boxed{\text{B}}
        unwrapped = _WRAPPER.sub(r"\1", text)
        if unwrapped == text:
            break
        text = unwrapped
    return text.strip()


def _letters(text: str) -> frozenset[str] | None:
    """The set of option letters the text consists of, or None."""
    text = _unwrap(text)
    single = _SINGLE_LETTER.fullmatch(text)
    if single:
        return frozenset(single.group(1).upper())
    stripped = text.strip("()[]. ")
    if _UPPER_LETTERS.fullmatch(stripped):
        letters = [c for c in stripped if c.isupper()]
        if len(set(letters)) == len(letters) <= 26:
            return frozenset(letters)
    return None


def label_letters(label: str | None) -> frozenset[str] | None:
    if label is None or len(label) > _MAX_CHOICE_TEXT:
        return None
    return _letters(label)


def is_single_choice_label(label: str | None) -> bool:
    """True for labels `auto` sends to this verifier: one uppercase letter, decorated or not."""
    if label is None or len(label) > 64:
        return False
    match = _SINGLE_LETTER.fullmatch(_unwrap(label))
    return match is not None and match.group(1).isupper()


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{…}` (balanced braces), or None."""
    start = text.rfind("\\boxed")
    while start >= 0:
        brace = start + len("\\boxed")
        while brace < len(text) and text[brace] == " ":
            brace += 1
        if brace < len(text) and text[brace] == "{":
            depth = 0
            for index in range(brace, len(text)):
                if text[index] == "{":
                    depth += 1
                elif text[index] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[brace + 1 : index]
        start = text.rfind("\\boxed", 0, start)
    return None


def answer_letters(text: str) -> frozenset[str] | None:
    """The option letters a response commits to (see the module docstring)."""
    boxed = last_boxed(text[-_MAX_CHOICE_TEXT:])
    candidates = [boxed] if boxed is not None else []
    candidates.append(text.strip()[:_MAX_CHOICE_TEXT])
    for candidate in candidates:
        letters = _letters(candidate)
        if letters is not None:
            return letters
        leading = _LEADING_OPTION.match(_unwrap(candidate))
        if leading:
            return frozenset(next(group for group in leading.groups() if group))
    said = list(_ANSWER_IS.finditer(text[-_MAX_CHOICE_TEXT:]))
    if said:
        return frozenset(said[-1].group(1).upper())
    return None


@register_verifier("choice")
def choice_accuracy(request: AccuracyRequest, settings: AccuracySettings) -> AccuracyOutcome:
    """1.0 when the response's set of option letters equals the label's."""
    expected = label_letters(request.label)
    if expected is None:
        return AccuracyOutcome(0.0, AccuracyStatus.LABEL_UNPARSEABLE)
    got = answer_letters(request.text)
    if got is None:
        return AccuracyOutcome(0.0, AccuracyStatus.NO_ANSWER)
    extracted = ",".join(sorted(got))
    return AccuracyOutcome(1.0 if got == expected else 0.0, AccuracyStatus.OK, extracted=extracted)
