"""Finding the model's response inside a chat-templated query (`/get_reward`'s `query`).

OpenRLHF sends the decoded prompt-plus-response with special tokens kept. The response starts
after the template's assistant marker. Two ways (`ResponseExtraction`):

`reference` (profile `lmm-r1`), the LMM-R1 reference rule for rule:
- the marker is a regular expression, written as the reference writes it, and its *first*
  match counts. For `phi3`/`phi4` the reference's `<|assistant|>\\n` is unescaped, so it
  means "`<`, or `assistant`, or `>` and a newline": the response starts after the first `<`
  of the query. Reproduced on purpose (use `last_marker` for a working phi template);
- the four end tokens `REFERENCE_END_TOKENS` (ChatML's, DeepSeek-R1's, Qwen's end of text,
  Gemma's end of turn) are deleted wherever they occur, in that order, then whitespace stripped;
- no marker, or nothing left: the *raw* query (not stripped, end tokens kept) is the response.

`last_marker` (profiles `strict`, `lenient`): the *last* literal marker (a few-shot prompt has
earlier assistant turns); trailing end-of-turn / padding tokens and surrounding whitespace are
stripped; a query without the marker is used whole, stripped the same way.

Either way a query without the marker is reported as `no_response_marker`; template `none`
means the query is the response (`reference`: as is; `last_marker`: stripped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmmr1_trainer.verifier.config import PromptTemplate, ResponseExtraction

# Tokens that end a turn or pad a decoded sequence; never part of a real response's tail.
END_TOKENS: tuple[str, ...] = (
    "<|im_end|>",
    "<|endoftext|>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",  # DeepSeek-R1 (full-width bars)
    "<end_of_turn>",
    "<|end|>",
    "<eos>",
    "</s>",
)

_RESPONSE_MARKERS: dict[PromptTemplate, str] = {
    PromptTemplate.CHATML: "<|im_start|>assistant\n",
    PromptTemplate.QWEN1: "<\uff5cAssistant\uff5c>",
    PromptTemplate.BASE: "Assistant: ",
    PromptTemplate.PHI3: "<|assistant|>\n",
    PromptTemplate.PHI4: "<|assistant|>\n",
    PromptTemplate.GEMMA3: "<start_of_turn>model\n",
    PromptTemplate.NONE: "",
}


# The reference deletes exactly these, everywhere, in this order.
REFERENCE_END_TOKENS: tuple[str, ...] = (
    "<|im_end|>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
    "<|endoftext|>",
    "<end_of_turn>",
)

# The reference's markers as the regular expressions it compiles (phi3/phi4 unescaped).
_REFERENCE_MARKERS: dict[PromptTemplate, re.Pattern[str]] = {
    PromptTemplate.CHATML: re.compile(r"<\|im_start\|>assistant\n"),
    PromptTemplate.QWEN1: re.compile("<\uff5cAssistant\uff5c>"),
    PromptTemplate.BASE: re.compile(r"Assistant: "),
    PromptTemplate.PHI3: re.compile(r"<|assistant|>\n"),
    PromptTemplate.PHI4: re.compile(r"<|assistant|>\n"),
    PromptTemplate.GEMMA3: re.compile(r"<start_of_turn>model\n"),
}


@dataclass(frozen=True)
class ExtractedResponse:
    text: str
    marker_found: bool


def response_marker(template: PromptTemplate) -> str:
    return _RESPONSE_MARKERS[template]


def strip_response(text: str, start: int = 0) -> str:
    """`text[start:]` without leading whitespace and trailing whitespace/end tokens.

    Works on indices so a tail of thousands of padding tokens costs linear time.
    """
    end = len(text)
    while True:
        while end > start and text[end - 1].isspace():
            end -= 1
        for token in END_TOKENS:
            if end - start >= len(token) and text.endswith(token, start, end):
                end -= len(token)
                break
        else:
            break
    while start < end and text[start].isspace():
        start += 1
    return text[start:end]


def _reference_extract(query: str, template: PromptTemplate) -> ExtractedResponse:
    pattern = _REFERENCE_MARKERS.get(template)
    if pattern is None:  # `none`: the query is the response
        return ExtractedResponse(query, marker_found=True)
    match = pattern.search(query)
    if match is None:
        return ExtractedResponse(query, marker_found=False)
    response = query[match.end() :]
    for token in REFERENCE_END_TOKENS:
        response = response.replace(token, "")
    # An empty response falls back to the raw query, as in the reference.
    return ExtractedResponse(response.strip() or query, marker_found=True)


def extract_response(
    query: str,
    template: PromptTemplate,
    extraction: ResponseExtraction = ResponseExtraction.REFERENCE,
) -> ExtractedResponse:
    """The response part of a templated query (see the module docstring)."""
    if extraction is ResponseExtraction.REFERENCE:
        return _reference_extract(query, template)
    marker = _RESPONSE_MARKERS[template]
    if not marker:
        return ExtractedResponse(strip_response(query), marker_found=True)
    position = query.rfind(marker)
    if position < 0:
        return ExtractedResponse(strip_response(query), marker_found=False)
    return ExtractedResponse(strip_response(query, position + len(marker)), marker_found=True)
