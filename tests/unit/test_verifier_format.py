"""The `exact_tags` format rule, the <answer> block, and the `last_marker` way of finding the
response in a chat-templated query (profiles `strict` and `lenient`; the `lmm-r1` rules are
tested in test_verifier_reference_parity.py)."""

from __future__ import annotations

import time
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmmr1_trainer.verifier import format as format_module
from lmmr1_trainer.verifier.config import FormatRule, PromptTemplate, ResponseExtraction
from lmmr1_trainer.verifier.format import answer_block
from lmmr1_trainer.verifier.templates import ExtractedResponse, strip_response
from lmmr1_trainer.verifier.templates import extract_response as _extract_response

format_score = partial(format_module.format_score, rule=FormatRule.EXACT_TAGS)
is_well_formed = partial(format_module.is_well_formed, rule=FormatRule.EXACT_TAGS)


def extract_response(query: str, template: PromptTemplate) -> ExtractedResponse:
    return _extract_response(query, template, ResponseExtraction.LAST_MARKER)


TAGS = ("<think>", "</think>", "<answer>", "</answer>")
fast = settings(max_examples=200, deadline=None, database=None)


def test_whitespace_between_blocks_is_refused_unless_allowed() -> None:
    response = "<think>a</think>\n\n<answer>b</answer>"
    assert not is_well_formed(response)
    assert is_well_formed(response, allow_whitespace_between_blocks=True)
    # Allowing whitespace does not allow text.
    assert not is_well_formed(
        "<think>a</think> so <answer>b</answer>", allow_whitespace_between_blocks=True
    )


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>a</think><answer>b</answer>", 1.0),
        ("<think>a</think><answer>b</answer><|im_end|>", 0.0),  # templates strip it first
        ("<think>a</think><answer>b</answer></answer>", 0.0),
        ("<think>a</think></think><answer>b</answer>", 0.0),
        ("<think>a<answer>b</answer></think><answer>c</answer>", 0.0),
        ("<think>a</think><answer>b</answer>\n\n", 1.0),
        ("\t<think>a</think><answer>b</answer>", 1.0),
    ],
)
def test_format_score(response: str, expected: float) -> None:
    assert format_score(response) == expected


def test_answer_block_is_the_last_complete_one() -> None:
    assert answer_block("<answer>1</answer> then <answer>2</answer>") == "2"
    assert answer_block("<answer>1</answer> then <answer>2") == "1"
    assert answer_block("<answer></answer>") == ""
    assert answer_block("no tags") is None
    assert answer_block("</answer><answer>") is None


def test_format_and_answer_block_are_linear_on_hostile_input() -> None:
    hostile = "<answer>" * 20_000 + "</think>" * 20_000
    started = time.monotonic()
    assert format_score(hostile) == 0.0
    assert answer_block(hostile) is None
    assert answer_block(hostile + "</answer>") == "</think>" * 20_000
    assert time.monotonic() - started < 0.5


@fast
@given(think=st.text(), answer=st.text())
def test_any_tag_free_content_is_well_formed(think: str, answer: str) -> None:
    for tag in TAGS:
        think, answer = think.replace(tag, ""), answer.replace(tag, "")
    response = f"<think>{think}</think><answer>{answer}</answer>"
    # Removing one tag can create another ("<thi<think>nk>"); only test clean content.
    if any(tag in think or tag in answer for tag in TAGS):
        return
    assert format_score(response) == 1.0
    assert answer_block(response) == answer


@fast
@given(st.lists(st.sampled_from([*TAGS, "a", " ", "\n", "<", ">", "/"]), max_size=30).map("".join))
def test_format_score_is_total(response: str) -> None:
    score = format_score(response)
    assert score in (0.0, 1.0)
    if score == 1.0:
        text = response.strip()
        assert text.startswith("<think>") and text.endswith("</answer>")
        assert all(text.count(tag) == 1 for tag in TAGS)


# -- chat templates ----------------------------------------------------------------------------

CHATML_QUERY = (
    "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ("<think>a</think><answer>2</answer><|im_end|>", "<think>a</think><answer>2</answer>"),
        ("  answer  <|im_end|>\n<|endoftext|><|endoftext|>", "answer"),
        ("answer" + "<|endoftext|>" * 1000, "answer"),
        ("<|im_end|>", ""),
        ("keep <|im_end|> in the middle<|im_end|>", "keep <|im_end|> in the middle"),
    ],
)
def test_chatml_response_follows_the_assistant_marker(tail: str, expected: str) -> None:
    extracted = extract_response(CHATML_QUERY + tail, PromptTemplate.CHATML)
    assert (extracted.text, extracted.marker_found) == (expected, True)


def test_the_last_assistant_turn_is_the_response() -> None:
    few_shot = CHATML_QUERY + "1<|im_end|>\n<|im_start|>user\nAnd 2+2?<|im_end|>\n"
    query = few_shot + "<|im_start|>assistant\n4<|im_end|>"
    assert extract_response(query, PromptTemplate.CHATML).text == "4"


def test_a_query_without_the_marker_is_used_whole_and_flagged() -> None:
    extracted = extract_response("User: hi\nAssistant: there", PromptTemplate.CHATML)
    assert extracted == extracted.__class__("User: hi\nAssistant: there", marker_found=False)


@pytest.mark.parametrize(
    ("template", "query"),
    [
        (PromptTemplate.QWEN1, "<\uff5cUser\uff5c>q<\uff5cAssistant\uff5c>R"),
        (PromptTemplate.BASE, "User: q\n\nAssistant: R"),
        (PromptTemplate.PHI3, "<|user|>\nq<|end|>\n<|assistant|>\nR<|end|>"),
        (PromptTemplate.PHI4, "<|user|>\nq<|end|>\n<|assistant|>\nR<|end|>"),
        (PromptTemplate.GEMMA3, "<start_of_turn>user\nq<end_of_turn>\n<start_of_turn>model\nR"),
        (PromptTemplate.NONE, "  R\n"),
    ],
)
def test_other_templates(template: PromptTemplate, query: str) -> None:
    assert extract_response(query, template).text == "R"


def test_stripping_a_long_padding_tail_is_linear() -> None:
    started = time.monotonic()
    assert strip_response("x" + "<|endoftext|>" * 200_000) == "x"
    assert time.monotonic() - started < 1.0
