"""The paper's format rule, in two variants, and the `<answer>` block the accuracy reward reads.

`FormatRule.REFERENCE` (profile `lmm-r1`): the LMM-R1 reference's check, on the response as
extracted (no further stripping). The reference matches
`^<think>(?:(?!</think>).)*</think><answer>(?:(?!</answer>).)*</answer>\\Z` with DOTALL and
requires `<think>` and `<answer>` to occur once each. Read as rules:

- the text starts with `<think>`; the thinking runs to the first `</think>`;
- `<answer>` follows that `</think>` immediately (no whitespace);
- the answer runs to the first `</answer>` after it, which must end the text (`\\Z`: not
  even a newline after it);
- `<think>` and `<answer>` occur exactly once; closing tags are not counted, so a `</think>`
  inside the answer, or a `</answer>` inside the thinking, passes;
- contents may be empty or hold anything else, newlines included.

`FormatRule.EXACT_TAGS` (profiles `strict`, `lenient`): after stripping surrounding
whitespace the text is exactly `<think>…</think><answer>…</answer>` with each of the four
tags once, `<answer>` right after `</think>`.

`allow_whitespace_between_blocks` relaxes "immediately" in both. Both are linear scans, so a
100 kB response costs microseconds.
"""

from __future__ import annotations

from lmmr1_trainer.verifier.config import FormatRule

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"


def _answer_follows(text: str, think_close: int, allow_whitespace: bool) -> int | None:
    """Where `<answer>` starts if it follows the `</think>` at `think_close`, else None."""
    start = think_close + len(THINK_CLOSE)
    if allow_whitespace:
        while start < len(text) and text[start].isspace():
            start += 1
    return start if text.startswith(ANSWER_OPEN, start) else None


def _reference_well_formed(text: str, allow_whitespace: bool) -> bool:
    if not text.startswith(THINK_OPEN):
        return False
    if text.count(THINK_OPEN) != 1 or text.count(ANSWER_OPEN) != 1:
        return False
    think_close = text.find(THINK_CLOSE, len(THINK_OPEN))
    if think_close < 0:
        return False
    answer_open = _answer_follows(text, think_close, allow_whitespace)
    if answer_open is None:
        return False
    answer_close = text.find(ANSWER_CLOSE, answer_open + len(ANSWER_OPEN))
    return answer_close >= 0 and answer_close + len(ANSWER_CLOSE) == len(text)


def _exact_tags_well_formed(response: str, allow_whitespace: bool) -> bool:
    text = response.strip()
    if not (text.startswith(THINK_OPEN) and text.endswith(ANSWER_CLOSE)):
        return False
    if any(text.count(tag) != 1 for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)):
        return False
    return _answer_follows(text, text.index(THINK_CLOSE), allow_whitespace) is not None


def is_well_formed(
    response: str,
    *,
    rule: FormatRule = FormatRule.REFERENCE,
    allow_whitespace_between_blocks: bool = False,
) -> bool:
    """True when the response is one think block followed by one answer block (per `rule`)."""
    if rule is FormatRule.REFERENCE:
        return _reference_well_formed(response, allow_whitespace_between_blocks)
    return _exact_tags_well_formed(response, allow_whitespace_between_blocks)


def format_score(
    response: str,
    *,
    rule: FormatRule = FormatRule.REFERENCE,
    allow_whitespace_between_blocks: bool = False,
) -> float:
    """The format reward before weighting: 1.0 when well formed, else 0.0."""
    well_formed = is_well_formed(
        response, rule=rule, allow_whitespace_between_blocks=allow_whitespace_between_blocks
    )
    return 1.0 if well_formed else 0.0


def answer_block(response: str) -> str | None:
    """The content of the last complete `<answer>…</answer>` block, or None (linear time)."""
    end = response.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = response.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return response[start + len(ANSWER_OPEN) : end]
