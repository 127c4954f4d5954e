"""Finding the model's response inside a chat-templated query (`/get_reward`'s `query`).

OpenRLHF sends the decoded prompt-plus-response with special tokens kept. The response starts
after the template's assistant marker; we take the *last* marker (a few-shot prompt has earlier
assistant turns) and strip trailing end-of-turn / padding tokens and surrounding whitespace,
like the LMM-R1 reference. A query without the marker is used whole (as the reference does)
and reported as `no_response_marker`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmmr1_trainer.verifier.config import PromptTemplate

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


def extract_response(query: str, template: PromptTemplate) -> ExtractedResponse:
    """The response part of a templated query (see the module docstring)."""
    marker = _RESPONSE_MARKERS[template]
    if not marker:
        return ExtractedResponse(strip_response(query), marker_found=True)
    position = query.rfind(marker)
    if position < 0:
        return ExtractedResponse(strip_response(query), marker_found=False)
    return ExtractedResponse(strip_response(query, position + len(marker)), marker_found=True)
