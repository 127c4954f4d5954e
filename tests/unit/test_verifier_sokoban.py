"""The `sokoban` verifier, from the rules of LMM-R1's `sokoban_verifier.py` (see the module
docstring of `lmmr1_trainer.verifier.sokoban`): numbers written down by hand on small
levels, the engine's treatment of a task that owns its format, and a fuzz test on the
answer text in which every call returns a finite reward within the reward's bounds.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmmr1_trainer.tasks.sokoban.level import Level
from lmmr1_trainer.verifier.config import VerifierConfig
from lmmr1_trainer.verifier.engine import Sample, Verifier
from lmmr1_trainer.verifier.rewards import SampleResult, verifier_traits
from lmmr1_trainer.verifier.sokoban import has_back_to_back_repeats

# Player, box, target in a corridor: Right, Right, Right solves it.
CORRIDOR = "#######\n#@ $ .#\n#######"
# Two boxes: Right puts the first on a target (+1), a second Right pushes it off (-1).
TWO_BOXES = "########\n#@$.   #\n#  $  .#\n########"


def _verifier(**overrides: object) -> Verifier:
    return Verifier(
        VerifierConfig.model_validate(
            {"pool": {"workers": 0}, "accuracy": {"default_task": "sokoban"}, **overrides}
        )
    )


def _score(response: str, level: str = CORRIDOR, **overrides: object) -> SampleResult:
    [result] = _verifier(**overrides).score([Sample(response, level)])
    return result


def _answer(actions: list[str], thinking: str = "plan") -> str:
    return f"<think>{thinking}</think><answer>{', '.join(actions)}</answer>"


def test_sokoban_is_built_in_and_owns_its_format() -> None:
    traits = verifier_traits("sokoban")
    assert traits.owns_format and not traits.bounded


def test_a_solving_answer_earns_the_win_the_actions_and_the_thinking() -> None:
    result = _score(_answer(["Right"] * 3, "push the box right"))
    # steps: -0.1, -0.1, -0.1 + 1 + 10 -> running totals -0.1, -0.2, 10.7 (the best)
    # actions: 3 * 0.05; thinking: 4 words of 2+ characters * 0.001
    assert result.format_reward == 0.5
    assert result.accuracy_score == pytest.approx(10.7 + 0.15 + 0.004)
    assert result.reward == pytest.approx(0.5 + 10.7 + 0.15 + 0.004)
    assert result.status == "ok" and result.extracted_answer == "right, right, right"
    assert "solved: True" in (result.detail or "")


def test_a_wrong_answer_keeps_the_format_and_shaping_but_no_environment_reward() -> None:
    result = _score(_answer(["Left", "Up"], "a"))  # both blocked: -0.2, best stays 0
    assert result.format_reward == 0.5
    assert result.accuracy_score == pytest.approx(0.1)


def test_actions_after_the_win_are_not_played_but_are_counted() -> None:
    result = _score(_answer(["Right"] * 3 + ["Left"] * 4, "x"))
    assert result.accuracy_score == pytest.approx(10.7 + 7 * 0.05)


def test_the_best_running_total_counts_not_the_last() -> None:
    # Right: box on a target, -0.1 + 1 = 0.9; Right again: off it, -0.1 - 1 -> total -0.2.
    on_then_off = _score(_answer(["Right", "Right"], "x"), TWO_BOXES)
    assert on_then_off.accuracy_score == pytest.approx(0.9 + 2 * 0.05)


def test_only_the_first_50_actions_are_played() -> None:
    # 47 blocked moves then the solution: played, 6.0 = -4.7 - 0.2 + 10.9.
    inside = _score(_answer(["Left"] * 47 + ["Right"] * 3, "x"))
    # 50 blocked moves then the solution: never played.
    outside = _score(_answer(["Left"] * 50 + ["Right"] * 3, "x"))
    # Both repeat `left` more than 7 times in a row: the action term is min(0, x - 0.2) = 0.
    assert inside.accuracy_score == pytest.approx(6.0)
    assert outside.accuracy_score == pytest.approx(0.0)
    assert outside.format_reward == 0.5


@pytest.mark.parametrize(
    ("count", "term"),
    [(1, 0.05), (19, 0.95), (20, 1.0), (50, 0.8), (80, 0.2), (110, -0.8)],
)
def test_the_action_term_grows_to_20_then_falls_quadratically(count: int, term: float) -> None:
    # Alternating Up/Down/Left/Right blocks in a 4-cycle: no 1-4-gram repeats 8 times in a
    # row... except the 4-gram itself past 32 actions, so use a 6-cycle (k <= 5 only).
    cycle = ["Up", "Up", "Down", "Left", "Left", "Down"]
    actions = [cycle[i % len(cycle)] for i in range(count)]
    result = _score(_answer(actions, "x"), "#####\n#@$.#\n#####")
    # In a 1-row corridor Up/Down are blocked; Left is blocked too: no move, best 0.
    assert result.accuracy_score == pytest.approx(term)


def test_a_repeated_run_of_more_than_7_is_penalised() -> None:
    assert not has_back_to_back_repeats(["up"] * 7)
    assert has_back_to_back_repeats(["up"] * 8)
    assert not has_back_to_back_repeats(["up", "down"] * 7)
    assert has_back_to_back_repeats(["up", "down"] * 8)
    assert has_back_to_back_repeats(["up", "left", "down"] * 8)
    assert has_back_to_back_repeats(["up", "up", "left", "down", "down"] * 8)
    # A 6-gram is not looked at, and its parts never follow themselves 8 times.
    assert not has_back_to_back_repeats(["up", "up", "left", "left", "down", "right"] * 8)
    # A run broken once starts again.
    assert not has_back_to_back_repeats(["up"] * 5 + ["down"] + ["up"] * 5)
    seven, eight = _score(_answer(["Left"] * 7, "x")), _score(_answer(["Left"] * 8, "x"))
    assert seven.accuracy_score == pytest.approx(0.35)
    assert eight.accuracy_score == pytest.approx(min(0.0, 0.4 - 0.2))


def test_thinking_counts_space_separated_words_of_two_characters_up_to_200() -> None:
    words = " ".join(["ab"] * 250)
    assert _score(_answer(["Left"], words)).accuracy_score == pytest.approx(0.05 + 0.2)
    assert _score(_answer(["Left"], "a b c de")).accuracy_score == pytest.approx(0.051)
    # Only single spaces separate words: a newline does not.
    assert _score(_answer(["Left"], "ab\ncd ef")).accuracy_score == pytest.approx(0.052)


@pytest.mark.parametrize(
    "response",
    [
        "Right, Right, Right",  # no tags
        "<answer>Right, Right, Right</answer>",  # no thinking
        "<think>x</think><answer>Right, Jump</answer>",  # not an action
        "<think>x</think><answer></answer>",  # an empty answer is one empty item
        "<think>x</think><answer>Right,,Right</answer>",  # an empty item
        "<think>x</think><answer>Right Right</answer>",  # no comma
        "<think>x</think><think>y</think><answer>Right</answer>",  # two thinking blocks
        "<think>x</think><answer>Right</answer><answer>Right</answer>",  # two answers
        "<think>x</think><answer>Right",  # unclosed
    ],
)
def test_a_malformed_answer_scores_nothing(response: str) -> None:
    result = _score(response)
    assert (result.reward, result.format_reward, result.accuracy_score) == (0.0, 0.0, 0.0)


def test_the_format_checks_counts_and_actions_only() -> None:
    # As in the reference: order, case, spacing and text around the tags are not checked.
    assert _score("hello <think>x</think> then <answer> RIGHT ,right\n</answer> bye").reward > 0.5
    assert _score("</answer><think>x</think><answer>Right").format_reward == 0.5


def test_a_label_that_is_not_a_level_is_flagged() -> None:
    result = _score(_answer(["Right"]), "not a level", profile="strict")
    assert result.status == "label_unparseable" and result.skip
    assert "not a Sokoban level" in (result.detail or "")
    assert (result.accuracy_score, result.format_reward) == (0.0, 0.5)


def test_the_whole_response_is_read_whatever_the_answer_source() -> None:
    # `lenient` hands math its <answer> block only; sokoban needs the thinking too.
    result = _score(_answer(["Right"] * 3, "push the box right"), profile="lenient")
    assert result.accuracy_score == pytest.approx(10.7 + 0.15 + 0.004)


def test_weights_apply_to_the_format_and_the_task_reward() -> None:
    result = _score(_answer(["Right"] * 3, "x"), weights={"format": 1.0, "accuracy": 2.0})
    assert result.format_reward == 1.0
    assert result.accuracy_reward == pytest.approx(2 * 10.85)


def test_from_a_chat_templated_query_as_the_trainer_sends_it() -> None:
    verifier = _verifier()
    query = (
        "<|im_start|>user\nplay<|im_end|>\n<|im_start|>assistant\n"
        + _answer(["Right"] * 3, "x")
        + "<|im_end|>"
    )
    [result] = verifier.score(verifier.samples_from_queries([query], [CORRIDOR]))
    assert result.reward == pytest.approx(0.5 + 10.85)


# -- fuzz: nothing hangs, crashes or leaves the reward's bounds ------------------------------

_PIECES = [
    "<think>", "</think>", "<answer>", "</answer>", "Left", "Right", "Up", "Down", "UP",
    "left", ",", ", ", " ", "\n", "\t", "\u00a0", "<", ">", "/", "think", "answer", "é",
    "\u202e", "\U0001f600", "\x00", "<think><think>", "</answer></answer>", ",,",
]  # fmt: skip
_LEVEL = Level.parse(TWO_BOXES)
# The environment's best total is at most one +1 per box and the win's +10; the action
# term at most 1.0 and the thinking term 0.2.
_UPPER = 0.5 + len(_LEVEL.boxes) + 10 + 1.0 + 0.2


def _check(result: SampleResult) -> None:
    assert math.isfinite(result.reward)
    assert result.reward <= _UPPER
    if result.format_score == 0.0:
        assert result.reward == 0.0


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=60).map("".join))
def test_fuzz_tag_soup_scores_within_bounds(response: str) -> None:
    _check(_score(response, TWO_BOXES))


@settings(max_examples=200, deadline=None, database=None)
@given(st.text(max_size=300))
def test_fuzz_any_unicode_text_scores_within_bounds(response: str) -> None:
    _check(_score(response, TWO_BOXES))


@settings(max_examples=100, deadline=None, database=None)
@given(
    st.lists(st.sampled_from(["Left", "Right", "Up", "Down", " up", "DOWN "]), min_size=1),
    st.text(max_size=100),
)
def test_fuzz_well_formed_answers_score_within_bounds(actions: list[str], thinking: str) -> None:
    thinking = thinking.replace("<", "")  # no stray tags: the format holds
    result = _score(f"<think>{thinking}</think><answer>{','.join(actions)}</answer>", TWO_BOXES)
    assert result.format_score == 1.0
    _check(result)


def test_huge_answers_return_finite_rewards() -> None:
    limit = VerifierConfig().limits.max_response_chars
    actions = ",".join(["up"] * ((limit - 40) // 3))  # the most actions that fit the limit
    huge = _score(f"<think>x</think><answer>{actions}</answer>", TWO_BOXES)
    assert huge.format_score == 1.0 and math.isfinite(huge.reward)
    assert huge.reward < -1000  # the reference's quadratic term, unbounded below
    nested = "<think>" * 20_000 + "</think>" * 20_000 + "<answer>Up</answer>"
    too_long = "<think>x</think><answer>" + "Up," * limit + "Up</answer>"
    results = [_score(nested, TWO_BOXES), _score(too_long, TWO_BOXES)]
    assert [r.reward for r in results] == [0.0, 0.0]
    assert results[1].status == "response_too_long"
