"""The default profile, `lmm-r1`, scores every input as the LMM-R1 reference reward server.

The reference: TideDra/lmm-r1, `openrlhf/models/remote_rm/math_verifier.py` (`/get_reward`).
Its rules, as read there, and where each is tested below:

1. Response: the text after the *first* match of the template's marker, a regular expression
   as the reference writes it (phi3/phi4 unescaped); its four end tokens (ChatML's,
   DeepSeek-R1's, `<|endoftext|>`, `<end_of_turn>`) deleted wherever they are; stripped.
   No marker, or nothing left: the raw query.                          (test_response_*)
2. Format 0.5 when the response matches
   `^<think>(?:(?!</think>).)*</think><answer>(?:(?!</answer>).)*</answer>\\Z` (DOTALL) and
   holds `<think>` and `<answer>` once each.                            (test_format_*)
3. Label: `$` + label + `$` unless it starts with `$`; parsed with `LatexExtractionConfig()`;
   nothing parsed → accuracy 1.0 whatever the response.                  (test_label_*)
4. Answer: the whole response, LaTeX extraction with `\\boxed{}` first, anchored
   expressions only, no malformed operators.                             (test_answer_*)
5. `verify(answer, gold)`: the answer in math-verify's gold position.      (test_verify_*)
6. Reward = format + accuracy (0.5 + 1.0).

`reference_*` below re-express those rules with nothing of ours (math-verify and `re` only);
the cases with written-down values were checked against them and by running. The last part
tests that `strict` and `lenient` differ from `lmm-r1` exactly where docs/verifier.md says.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from latex2sympy2_extended import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify

from lmmr1_trainer.verifier.config import (
    PROFILE_DEFAULTS,
    PromptTemplate,
    RewardProfile,
    VerifierConfig,
)
from lmmr1_trainer.verifier.engine import Sample, Verifier
from lmmr1_trainer.verifier.rewards import SampleResult

# -- the reference's rules, re-expressed ------------------------------------------------------

REFERENCE_MARKERS = {
    "chatml": r"<\|im_start\|>assistant\n",
    "qwen1": "<\uff5cAssistant\uff5c>",
    "base": "Assistant: ",
    "phi3": r"<|assistant|>\n",  # unescaped in the reference: "<" | "assistant" | ">\n"
    "phi4": r"<|assistant|>\n",
    "gemma3": r"<start_of_turn>model\n",
}
REFERENCE_END_TOKENS = (
    "<|im_end|>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
    "<|endoftext|>",
    "<end_of_turn>",
)
REFERENCE_FORMAT = r"^<think>(?:(?!</think>).)*</think><answer>(?:(?!</answer>).)*</answer>\Z"
REFERENCE_ANSWER_CONFIG = [
    LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            nits=False, malformed_operators=False, basic_latex=True, boxed="all", units=True
        ),
        boxed_match_priority=0,
        try_extract_without_anchor=False,
    )
]


def reference_response(query: str, template: str = "chatml") -> str:
    found = re.search(REFERENCE_MARKERS[template], query)
    if found is None:
        return query
    response = query[found.end() :]
    for token in REFERENCE_END_TOKENS:
        response = response.replace(token, "")
    return response.strip() or query


def reference_format(response: str) -> float:
    matched = re.match(REFERENCE_FORMAT, response, re.DOTALL) is not None
    once = response.count("<think>") == 1 and response.count("<answer>") == 1
    return 1.0 if matched and once else 0.0


def reference_accuracy(response: str, label: str) -> float:
    if not label.startswith("$"):
        label = f"${label}$"
    gold = parse(label, extraction_mode="first_match", extraction_config=[LatexExtractionConfig()])
    if not gold:
        return 1.0
    answer = parse(
        response, extraction_config=REFERENCE_ANSWER_CONFIG, extraction_mode="first_match"
    )
    try:
        return float(verify(answer, gold))
    except Exception:
        return 0.0


def reference_rewards(query: str, label: str, template: str = "chatml") -> tuple[float, float]:
    """(format reward, accuracy reward) as `/get_reward` returns them."""
    response = reference_response(query, template)
    return 0.5 * reference_format(response), reference_accuracy(response, label)


# -- ours --------------------------------------------------------------------------------------


def _verifier(profile: str = "lmm-r1", **fields: Any) -> Verifier:
    data = {"profile": profile, "pool": {"workers": 0}, **fields}
    return Verifier(VerifierConfig.model_validate(data))


@pytest.fixture(scope="module")
def default() -> Iterator[Verifier]:
    # No profile named: the default must be the reference.
    with Verifier(VerifierConfig.model_validate({"pool": {"workers": 0}})) as verifier:
        yield verifier


def via_query(
    verifier: Verifier, query: str, label: str | None, template: str = "chatml"
) -> SampleResult:
    """Scored as `/get_reward` scores it: the response found in the templated query."""
    with_template = verifier
    if template != verifier.config.prompt_template:
        config = verifier.config.model_copy(update={"prompt_template": PromptTemplate(template)})
        with_template = Verifier(config)
    [result] = with_template.score(with_template.samples_from_queries([query], [label]))
    return result


def ours(verifier: Verifier, query: str, label: str, template: str = "chatml") -> tuple[float, ...]:
    result = via_query(verifier, query, label, template)
    return result.format_reward, result.accuracy_reward


SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def chatml(response: str, question: str = "What is 1+1?") -> str:
    return (
        f"{SYSTEM}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{response}"
        "<|im_end|><|endoftext|>"
    )


def W(answer: str, think: str = "t") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


# -- 1. the response in the query ---------------------------------------------------------------


def test_response_end_tokens_are_deleted_anywhere(default: Verifier) -> None:
    # The reference deletes end tokens inside the response too, so this is well formed.
    query = chatml("<think>a<end_of_turn></think><|im_end|><answer>\\boxed{2}</answer>")
    assert reference_rewards(query, "2") == ours(default, query, "2") == (0.5, 1.0)
    strict = _verifier("strict")  # only trailing tokens are stripped there
    assert ours(strict, query, "2") == (0.0, 1.0)


def test_response_is_after_the_first_assistant_marker(default: Verifier) -> None:
    # Few-shot: an earlier assistant turn. The reference reads from the first one, so the
    # response spans both turns (not well formed; both boxed answers are read).
    second = W(r"\boxed{4}")
    query = (
        f"{SYSTEM}<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n\\boxed{{7}}<|im_end|>\n"
        f"<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n{second}<|im_end|>"
    )
    expected = reference_rewards(query, "4")
    assert ours(default, query, "4") == expected
    assert expected[0] == 0.0
    assert ours(_verifier("strict"), query, "4") == (0.5, 1.0)  # the last turn only


def test_response_without_a_marker_is_the_raw_query(default: Verifier) -> None:
    # Not stripped, end token kept: not well formed, though the answer is still read.
    query = "\n" + W(r"\boxed{2}") + "<|im_end|>"
    result = via_query(default, query, "2")
    assert (result.format_reward, result.accuracy_reward) == reference_rewards(query, "2")
    assert (result.format_reward, result.accuracy_reward) == (0.0, 1.0)
    assert "no_response_marker" in result.flags
    # A raw query that is exactly well formed passes, as in the reference.
    assert ours(default, W(r"\boxed{2}"), "2") == (0.5, 1.0)


def test_response_that_is_empty_falls_back_to_the_whole_query(default: Verifier) -> None:
    # Nothing after the marker: the reference scores the whole query, question included.
    query = chatml("", question=r"The answer is $\frac{1}{2}$, isn't it?")
    assert reference_rewards(query, "0.5") == ours(default, query, "0.5") == (0.0, 1.0)
    assert ours(_verifier("strict"), query, "0.5") == (0.0, 0.0)


@pytest.mark.parametrize(
    ("template", "query", "expected"),
    [
        ("qwen1", "<\uff5cUser\uff5c>q<\uff5cAssistant\uff5c>" + W(r"\boxed{2}"), (0.5, 1.0)),
        ("base", "User: q\n\nAssistant: " + W(r"\boxed{2}") + "</s>", (0.0, 1.0)),
        (
            "gemma3",
            "<start_of_turn>user\nq<end_of_turn>\n<start_of_turn>model\n"
            + W(r"\boxed{2}")
            + "<end_of_turn>",
            (0.5, 1.0),
        ),
        # The reference's unescaped phi pattern matches the query's first "<": the "response"
        # is nearly the whole query, never well formed.
        ("phi3", "<|user|>\nq<|end|>\n<|assistant|>\n" + W(r"\boxed{2}"), (0.0, 1.0)),
        ("phi4", "<|user|>\nq<|end|>\n<|assistant|>\n" + W(r"\boxed{2}"), (0.0, 1.0)),
    ],
)
def test_response_in_other_templates(
    default: Verifier, template: str, query: str, expected: tuple[float, float]
) -> None:
    assert reference_rewards(query, "2", template) == expected
    assert ours(default, query, "2", template) == expected


# -- 2. format ---------------------------------------------------------------------------------

FORMAT_CASES = [
    (W("b"), 1.0),
    ("<think></think><answer></answer>", 1.0),
    ("<think>\nx\n</think><answer>\ny\n</answer>", 1.0),  # DOTALL: contents span lines
    ("<think>a</think>\n<answer>b</answer>", 0.0),  # whitespace between the blocks
    ("<think>a</think> <answer>b</answer>", 0.0),
    ("<think>a</think>so<answer>b</answer>", 0.0),
    ("x<think>a</think><answer>b</answer>", 0.0),  # text outside
    ("<think>a</think><answer>b</answer>x", 0.0),
    ("<think>a</think><answer>b</think></answer>", 1.0),  # closing tags are not counted
    ("<think>a</answer></think><answer>b</answer>", 1.0),
    ("<think>a</think><answer>b</answer></answer>", 0.0),  # the first </answer> must end it
    ("<think>a</think></think><answer>b</answer>", 0.0),  # <answer> must follow the first
    ("<think>a<think>b</think></think><answer>c</answer>", 0.0),  # nested: two <think>
    ("<think>a</think><answer>b<answer>c</answer></answer>", 0.0),
    ("<think>a<answer>b</answer></think><answer>c</answer>", 0.0),
    ("<think>a</think><answer>b</answer><think>", 0.0),
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),  # extra block
    ("<think>a</think>", 0.0),  # missing blocks
    ("<answer>b</answer>", 0.0),
    ("<think>a</think><answer>b", 0.0),
    ("<answer>b</answer><think>a</think>", 0.0),
    ("<THINK>a</THINK><ANSWER>b</ANSWER>", 0.0),  # case-sensitive
]


@pytest.mark.parametrize(("response", "expected"), FORMAT_CASES)
def test_format_rule(default: Verifier, response: str, expected: float) -> None:
    assert reference_format(response) == expected
    query = chatml(response)
    assert ours(default, query, "2")[0] == 0.5 * expected


def test_format_is_checked_on_the_response_as_given(default: Verifier) -> None:
    # /v1/rewards `response` is the extracted text: the reference's `\\Z` and `^` apply to it.
    for response, expected in [(W("b") + "\n", 0.0), (" " + W("b"), 0.0), (W("b"), 1.0)]:
        [result] = default.score([Sample(response, "2")])
        assert result.format_score == reference_format(response) == expected


TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.sampled_from([*TAGS, "a", " ", "\n", "<", ">", "/"]), max_size=24).map("".join))
def test_format_agrees_with_the_reference_regex_on_any_tag_soup(response: str) -> None:
    from lmmr1_trainer.verifier.config import FormatRule
    from lmmr1_trainer.verifier.format import format_score

    assert format_score(response, rule=FormatRule.REFERENCE) == reference_format(response)


# -- 3. labels ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "label", "accuracy", "unparseable"),
    [
        (r"\boxed{2}", "2", 1.0, False),  # wrapped: $2$
        (r"\boxed{2}", "$2$", 1.0, False),  # already starts with $
        (r"\boxed{2}", " 2", 1.0, False),  # not stripped: $ 2$ still parses
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0, False),
        (r"\boxed{2}", r"\[2\]", 0.0, False),  # wrapped again: $\[2\]$
        (r"\boxed{7}", "$2", 1.0, True),  # starts with $, left unclosed: nothing parses
        ("nothing at all", "", 1.0, True),
        ("nothing at all", "$", 1.0, True),
        ("nothing at all", "$$", 1.0, True),
        (r"\boxed{3}", " ", 1.0, True),
    ],
)
def test_label_wrapping_and_unparseable_labels(
    default: Verifier, response: str, label: str, accuracy: float, unparseable: bool
) -> None:
    query = chatml(response)
    assert reference_rewards(query, label)[1] == accuracy
    result = via_query(default, query, label)
    assert result.accuracy_reward == accuracy
    assert (result.status == "label_unparseable") is unparseable
    assert result.skip is unparseable  # flagged either way, for whoever wants to drop it


def test_label_missing_scores_as_unparseable(default: Verifier) -> None:
    # No label at all (the reference would fail the request): the profile's unparseable rule.
    result = via_query(default, chatml("nothing"), None)
    assert (result.accuracy_reward, result.status) == (1.0, "label_unparseable")


# -- 4. the answer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "label", "accuracy"),
    [
        (W("2"), "2", 0.0),  # a bare <answer>2</answer> is no anchored answer
        (W(r"\boxed{2}"), "2", 1.0),
        (W("$2$"), "2", 1.0),  # $-delimited after a tag is read
        (W("The answer is $2$"), "2", 1.0),
        (W("The answer is 2"), "2", 0.0),
        (r"$3$ and \boxed{2}", "2", 1.0),  # boxed first
        (r"$3$ and \boxed{2}", "3", 0.0),
        (r"\boxed{1} then \boxed{2}", "2", 0.0),  # several boxed: read together
        (r"\boxed{1} then \boxed{2}", r"\{1,2\}", 1.0),
        (r"<think>maybe \boxed{3}</think><answer>0.5</answer>", "0.5", 0.0),  # whole response
        (r"<think>\boxed{1}</think><answer>\boxed{2}</answer>", "2", 1.0),
    ],
)
def test_answer_is_read_from_the_whole_response(
    default: Verifier, response: str, label: str, accuracy: float
) -> None:
    query = chatml(response)
    assert reference_rewards(query, label)[1] == accuracy
    assert ours(default, query, label)[1] == accuracy


# -- 5. verify's argument order ----------------------------------------------------------------

ASYMMETRIC = [  # (answer, label, reference accuracy, accuracy with the label first)
    (r"x \geq 1", r"[1,\infty)", 1.0, 0.0),  # inequality answer, interval label
    (r"x \le 3", r"(-\infty, 3]", 1.0, 0.0),
    (r"[1,\infty)", r"x \geq 1", 0.0, 1.0),  # and the reverse
    (r"(-\infty, 3]", r"x \le 3", 0.0, 1.0),
    (r"1+1=2", "2", 0.0, 1.0),  # an equation answer is not unwrapped against a number
    ("2", "1+1=2", 1.0, 0.0),
]


@pytest.mark.parametrize(("answer", "label", "reference", "gold_first"), ASYMMETRIC)
def test_verify_takes_the_answer_first(
    default: Verifier, answer: str, label: str, reference: float, gold_first: float
) -> None:
    query = chatml(W(rf"\boxed{{{answer}}}"))
    assert reference_rewards(query, label) == (0.5, reference)
    assert ours(default, query, label) == (0.5, reference)
    assert ours(_verifier("strict"), query, label) == (0.5, gold_first)


def test_the_worker_pool_gets_the_profiles_rules() -> None:
    # The rules travel to the worker processes with the accuracy settings.
    config = VerifierConfig.model_validate({"pool": {"workers": 1}})
    queries = [chatml(W(rf"\boxed{{{answer}}}")) for answer, *_ in ASYMMETRIC]
    labels = [label for _, label, *_ in ASYMMETRIC]
    with Verifier(config) as pooled:
        results = pooled.score(pooled.samples_from_queries(queries, [*labels]))
    assert [r.accuracy_reward for r in results] == [row[2] for row in ASYMMETRIC]


# -- 6. any input ------------------------------------------------------------------------------

FRAGMENTS = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    r"\boxed{2}",
    r"\boxed{\frac{1}{2}}",
    r"\boxed{x \geq 1}",
    r"\boxed{[1,\infty)}",
    r"\boxed{1+1=2}",
    "$2$",
    "The answer is $3$",
    "2",
    " ",
    "\n",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>assistant\n",
    "text",
]
LABELS = [
    "2",
    "3",
    "0.5",
    r"\frac{1}{2}",
    "$2$",
    "$2",
    "",
    "$$",
    r"[1,\infty)",
    r"x \geq 1",
    "1+1=2",
    r"\text{B}",
]


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    response=st.lists(st.sampled_from(FRAGMENTS), max_size=10).map("".join),
    label=st.sampled_from(LABELS),
    marker=st.booleans(),
)
def test_any_query_scores_as_the_reference(
    default: Verifier, response: str, label: str, marker: bool
) -> None:
    query = chatml(response) if marker else response
    expected = reference_rewards(query, label)
    result = via_query(default, query, label)
    assert (result.format_reward, result.accuracy_reward) == expected
    assert result.reward == sum(expected)


# -- the other profiles ------------------------------------------------------------------------

# What docs/verifier.md says each profile changes relative to lmm-r1, and to nothing else.
DOCUMENTED_DIFFERENCES = {
    "strict": {
        "response_extraction": "last_marker",
        "unparseable_label_policy": "zero",
        "format.rule": "exact_tags",
        "accuracy.label_wrapping": "delimiters",
        "accuracy.verify_order": "gold_first",
        "accuracy.default_task": "auto",
    },
    "lenient": {
        "response_extraction": "last_marker",
        "unparseable_label_policy": "zero",
        "format.rule": "exact_tags",
        "accuracy.label_wrapping": "delimiters",
        "accuracy.verify_order": "gold_first",
        "accuracy.default_task": "auto",
        "accuracy.answer_source": "answer_block",
    },
}


def _flat(config: VerifierConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.model_dump(mode="json").items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": item for inner, item in value.items()})
        else:
            flat[key] = value
    return flat


@pytest.mark.parametrize("profile", ["strict", "lenient"])
def test_each_profile_differs_from_lmm_r1_exactly_where_documented(profile: str) -> None:
    reference = _flat(VerifierConfig())
    other = _flat(VerifierConfig.model_validate({"profile": profile}))
    changed = {key: other[key] for key in reference if other[key] != reference[key]}
    assert changed == {"profile": profile, **DOCUMENTED_DIFFERENCES[profile]}
    assert set(PROFILE_DEFAULTS) == set(RewardProfile)


def test_the_docs_profile_table_is_what_each_profile_resolves_to() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "verifier.md").read_text()
    section = docs[docs.index("## Reward profiles") :].split("\n\n|", 1)[1]
    lines = ("|" + section).split("\n\n", 1)[0].splitlines()  # the section's first table
    header = [cell.strip(" `") for cell in lines[0].strip("|").split("|")]
    profiles = [name.removesuffix(" (default)").strip("`") for name in header[1:]]
    assert profiles == [p.value for p in RewardProfile]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(profiles, cells[1:], strict=True))
    assert set(rows) == set(DOCUMENTED_DIFFERENCES["lenient"])  # every rule a profile sets
    for profile in profiles:
        resolved = _flat(VerifierConfig.model_validate({"profile": profile}))
        assert {name: values[profile] for name, values in rows.items()} == {
            name: resolved[name] for name in rows
        }, profile


class Difference(NamedTuple):
    """One input where one documented rule, and only it, changes the rewards."""

    setting: str
    response: str  # in a chatml query
    label: str
    lmm_r1: tuple[float, float]  # (format, accuracy) rewards
    strict: tuple[float, float]
    lenient: tuple[float, float]


RIGHT, WRONG = (0.5, 1.0), (0.5, 0.0)
BEHAVIOUR = [
    Difference(
        "response_extraction",
        "<think>a</think><|im_end|><answer>\\boxed{2}</answer>",
        "2",
        RIGHT,
        (0.0, 1.0),
        (0.0, 1.0),
    ),
    Difference("unparseable_label_policy", W(r"\boxed{2}"), "$$", RIGHT, WRONG, WRONG),
    Difference("format.rule", W(r"\boxed{2}</think>"), "2", RIGHT, (0.0, 1.0), (0.0, 1.0)),
    Difference("accuracy.label_wrapping", W(r"\boxed{2}"), r"\[2\]", WRONG, RIGHT, RIGHT),
    Difference("accuracy.verify_order", W(r"\boxed{x \geq 1}"), r"[1,\infty)", RIGHT, WRONG, WRONG),
    Difference("accuracy.default_task", W("The answer is (B)"), "B", WRONG, RIGHT, RIGHT),
    Difference("accuracy.answer_source", W("2"), "2", WRONG, WRONG, RIGHT),
]


@pytest.mark.parametrize("row", BEHAVIOUR, ids=[row.setting for row in BEHAVIOUR])
def test_each_documented_difference_changes_the_rewards(row: Difference) -> None:
    setting, response, label, lmm_r1, strict, lenient = row
    query = chatml(response)
    assert reference_rewards(query, label) == lmm_r1
    assert ours(_verifier("lmm-r1"), query, label) == lmm_r1
    assert ours(_verifier("strict"), query, label) == strict
    assert ours(_verifier("lenient"), query, label) == lenient
    # Setting that one rule back to lmm-r1's value in strict restores the reference's rewards.
    section, _, name = setting.rpartition(".")
    value = PROFILE_DEFAULTS[RewardProfile.LMM_R1][name]
    override: dict[str, Any] = {section: {name: value}} if section else {name: value}
    assert ours(_verifier("strict", **override), query, label) == lmm_r1
