"""The paper's format rule and the `<answer>` block the accuracy reward reads.

A response is well formed when, after stripping surrounding whitespace, it is exactly
`<think>…</think><answer>…</answer>`:

- it starts with `<think>` and ends with `</answer>`;
- each of `<think>`, `</think>`, `<answer>`, `</answer>` occurs exactly once;
- `<answer>` follows `</think>` immediately: no whitespace between the blocks (the LMM-R1
  reference regex `^<think>(?:(?!</think>).)*</think><answer>(?:(?!</answer>).)*</answer>\\Z`
  with its tag counts; `FormatSettings.allow_whitespace_between_blocks` relaxes this);
- tag contents may be empty or hold any text, newlines included (as in the reference).

One deliberate difference from the reference: it lets `</think>` appear inside the answer
(it counts only opening tags); we require exactly one of every tag.
The check is a handful of linear scans, so a 100 kB response costs microseconds.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"


def is_well_formed(response: str, *, allow_whitespace_between_blocks: bool = False) -> bool:
    """True when the response is exactly one think block followed by one answer block."""
    text = response.strip()
    if not (text.startswith(THINK_OPEN) and text.endswith(ANSWER_CLOSE)):
        return False
    if any(text.count(tag) != 1 for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)):
        return False
    after_think = text[text.index(THINK_CLOSE) + len(THINK_CLOSE) :]
    if allow_whitespace_between_blocks:
        after_think = after_think.lstrip()
    return after_think.startswith(ANSWER_OPEN)


def format_score(response: str, *, allow_whitespace_between_blocks: bool = False) -> float:
    """The format reward before weighting: 1.0 when well formed, else 0.0."""
    well_formed = is_well_formed(
        response, allow_whitespace_between_blocks=allow_whitespace_between_blocks
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
