"""The reward table: at least 100 (response, label) cases with the rewards they must get.

Every expected value was checked by running it, not written from memory, against the
versions of math-verify, latex2sympy2_extended and sympy that pyproject.toml pins
(math-verify 0.9.0, latex2sympy2_extended 1.11.0, sympy 1.14.0; the last tests of this file
fail when the installed ones differ). Where math-verify (or one of our own
rules) disagrees with mathematics, the row says so in `note` and expects what the verifier
really gives; docs/verifier.md lists these. `accuracy=None` means the label is unparseable
(status `label_unparseable`, scored by the policy: 0 in this profile).

The table is scored with profile `lenient` (the `<answer>` block is read, a bare expression in
it counts, unparseable labels score 0); the last test scores every math row with the default
profile `lmm-r1` against the reference re-expressed here. test_verifier_reference_parity.py
tests the reference's rules one by one.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from latex2sympy2_extended import NormalizationConfig
from math_verify import LatexExtractionConfig, parse, verify

from lmmr1_trainer.verifier.config import (
    PoolSettings,
    VerifierConfig,
)
from lmmr1_trainer.verifier.engine import Sample, Verifier

ROOT = Path(__file__).resolve().parents[2]


class Case(NamedTuple):
    name: str
    response: str
    label: str | None
    format: int
    accuracy: int | None  # None: the label is unparseable
    task: str | None = None
    note: str | None = None


def W(answer: str) -> str:
    """A well-formed response whose <answer> block holds `answer`."""
    return f"<think>reasoning</think><answer>{answer}</answer>"


CASES = [
    # -- format rule
    Case("fmt-ok", W(r"\boxed{2}"), "2", 1, 1),
    Case("fmt-empty-tags", "<think></think><answer></answer>", "2", 1, 0),
    Case("fmt-empty-think", r"<think></think><answer>\boxed{2}</answer>", "2", 1, 1),
    Case(
        "fmt-multiline",
        "<think>\nstep 1\nstep 2\n</think><answer>\n\\boxed{2}\n</answer>",
        "2",
        1,
        1,
    ),
    Case("fmt-outer-whitespace", "\n  <think>a</think><answer>\\boxed{2}</answer>  \n", "2", 1, 1),
    Case("fmt-newline-between", "<think>a</think>\n<answer>\\boxed{2}</answer>", "2", 0, 1),
    Case("fmt-space-between", "<think>a</think> <answer>\\boxed{2}</answer>", "2", 0, 1),
    Case("fmt-two-think", "<think>a</think><think>b</think><answer>\\boxed{2}</answer>", "2", 0, 1),
    Case(
        "fmt-two-answer",
        "<think>a</think><answer>\\boxed{1}</answer><answer>\\boxed{2}</answer>",
        "2",
        0,
        1,
    ),
    Case("fmt-text-after", "<think>a</think><answer>\\boxed{2}</answer> done", "2", 0, 1),
    Case("fmt-text-before", "so <think>a</think><answer>\\boxed{2}</answer>", "2", 0, 1),
    Case("fmt-no-think", "<answer>\\boxed{2}</answer>", "2", 0, 1),
    Case("fmt-no-answer", "<think>the answer is \\boxed{2}</think>", "2", 0, 1),
    Case("fmt-unclosed-answer", "<think>a</think><answer>\\boxed{2}", "2", 0, 1),
    Case("fmt-swapped", "<answer>\\boxed{2}</answer><think>a</think>", "2", 0, 1),
    Case(
        "fmt-close-think-in-answer",
        "<think>a</think><answer></think>\\boxed{2}</answer>",
        "2",
        0,
        1,
    ),
    Case("fmt-uppercase-tags", "<THINK>a</THINK><ANSWER>\\boxed{2}</ANSWER>", "2", 0, 1),
    Case(
        "fmt-nested-think", "<think>a<think>b</think></think><answer>\\boxed{2}</answer>", "2", 0, 1
    ),
    Case("fmt-plain-text", "The answer is $2$.", "2", 0, 1),
    Case("fmt-empty", "", "2", 0, 0),
    # -- accuracy: numbers and fractions
    Case("acc-int", W(r"\boxed{42}"), "42", 1, 1),
    Case("acc-int-wrong", W(r"\boxed{41}"), "42", 1, 0),
    Case("acc-half-vs-frac", W(r"\boxed{0.5}"), r"\frac{1}{2}", 1, 1),
    Case("acc-frac-vs-half", W(r"\boxed{\frac{1}{2}}"), "0.5", 1, 1),
    Case("acc-dfrac", W(r"\boxed{\dfrac{3}{4}}"), "0.75", 1, 1),
    Case("acc-slash-frac", W(r"\boxed{3/4}"), r"\frac34", 1, 1),
    Case(
        "acc-frac12-malformed",
        W(r"\boxed{\frac12}"),
        "0.5",
        1,
        0,
        note="reference config (malformed_operators=False): valid TeX \\frac12 is not read",
    ),
    Case("acc-neg", W(r"\boxed{-3}"), "-3", 1, 1),
    Case("acc-neg-sign-missing", W(r"\boxed{3}"), "-3", 1, 0),
    Case("acc-neg-frac", W(r"\boxed{-\frac{1}{2}}"), "-0.5", 1, 1),
    Case("acc-neg-frac-num", W(r"\boxed{\frac{-1}{2}}"), r"-\frac{1}{2}", 1, 1),
    Case("acc-neg-paren", W(r"\boxed{(-2)}"), "-2", 1, 1),
    Case("acc-1.0", W(r"\boxed{1.0}"), "1", 1, 1),
    Case("acc-thousands-comma", W(r"\boxed{1,000}"), "1000", 1, 1),
    Case("acc-thousands-brace", W(r"\boxed{1{,}000}"), "1000", 1, 1),
    Case("acc-repeating", W(r"\boxed{0.333333}"), r"\frac{1}{3}", 1, 1),
    Case("acc-rounded-2dp", W(r"\boxed{0.33}"), r"\frac{1}{3}", 1, 0),
    Case("acc-close-float", W(r"\boxed{1.000001}"), "1", 1, 0),
    Case("acc-sci-notation-label", W(r"\boxed{0.001}"), r"10^{-3}", 1, 1),
    Case("acc-power", W(r"\boxed{1024}"), r"2^{10}", 1, 1),
    # -- constants
    Case("acc-pi", W(r"\boxed{2\pi}"), r"2\pi", 1, 1),
    Case("acc-pi-decimal-6", W(r"\boxed{6.283185}"), r"2\pi", 1, 1),
    Case("acc-pi-decimal-2", W(r"\boxed{6.28}"), r"2\pi", 1, 0),
    Case("acc-pi-over", W(r"\boxed{\frac{\pi}{2}}"), r"\pi/2", 1, 1),
    Case("acc-e", W(r"\boxed{e^2}"), r"e^{2}", 1, 1),
    Case("acc-sqrt", W(r"\boxed{\sqrt{8}}"), r"2\sqrt{2}", 1, 1),
    Case("acc-sqrt-ratio", W(r"\boxed{\frac{\sqrt{2}}{2}}"), r"\frac{1}{\sqrt{2}}", 1, 1),
    Case("acc-cuberoot", W(r"\boxed{\sqrt[3]{27}}"), "3", 1, 1),
    Case("acc-log", W(r"\boxed{\log_2 8}"), "3", 1, 1),
    Case("acc-infty", W(r"\boxed{\infty}"), r"\infty", 1, 1),
    # -- percentages and degrees
    Case("pct-both", W(r"\boxed{50\%}"), r"50\%", 1, 1),
    Case("pct-answer-only", W(r"\boxed{50\%}"), "50", 1, 1),
    Case("pct-label-only", W(r"\boxed{50}"), r"50\%", 1, 1),
    Case("pct-fraction", W(r"\boxed{0.5}"), r"50\%", 1, 1),
    Case("pct-frac-answer", W(r"\boxed{\frac{1}{2}}"), r"50\%", 1, 1),
    Case("pct-vs-plain-half", W(r"\boxed{0.5}"), "50", 1, 0),
    Case("deg-both", W(r"\boxed{30^\circ}"), r"30^\circ", 1, 1),
    Case("deg-answer-only", W(r"\boxed{30^{\circ}}"), "30", 1, 1),
    Case("deg-label-only", W(r"\boxed{30}"), r"30^\circ", 1, 1),
    Case(
        "deg-vs-radians",
        W(r"\boxed{\frac{\pi}{6}}"),
        r"30^\circ",
        1,
        0,
        note="math-verify drops the degree sign: 30 != pi/6",
    ),
    Case(
        "deg-180-pi",
        W(r"\boxed{180^\circ}"),
        r"\pi",
        1,
        0,
        note="math-verify drops the degree sign: 180 != pi",
    ),
    Case(
        "deg-sin",
        W(r"\boxed{\sin 30^\circ}"),
        r"\frac{1}{2}",
        1,
        0,
        note="math-verify reads sin 30^\\circ as sin(30 rad)",
    ),
    Case(
        "deg-unicode",
        W(r"\boxed{45°}"),
        r"45",
        1,
        0,
        note="math-verify does not read the unicode degree sign",
    ),
    # -- intervals, sets, tuples
    Case("int-same", W(r"\boxed{[1,2)}"), "[1,2)", 1, 1),
    Case("int-open-closed", W(r"\boxed{(1,2]}"), "[1,2)", 1, 0),
    Case("int-infinite", W(r"\boxed{(-\infty, 3]}"), r"(-\infty,3]", 1, 1),
    Case("int-union", W(r"\boxed{(-\infty,0)\cup(1,\infty)}"), r"(-\infty,0)\cup(1,+\infty)", 1, 1),
    Case(
        "int-vs-ineq-answer",
        W(r"\boxed{x \le 3}"),
        r"(-\infty, 3]",
        1,
        0,
        note="math-verify is asymmetric: inequality answer vs interval label fails",
    ),
    Case("int-vs-ineq-label", W(r"\boxed{(-\infty, 3]}"), r"x \le 3", 1, 1),
    Case("int-open-vs-tuple", W(r"\boxed{(1,2)}"), "(1,2)", 1, 1),
    Case("tuple-order", W(r"\boxed{(2,1)}"), "(1,2)", 1, 0),
    Case("set-order", W(r"\boxed{\{2,1\}}"), r"\{1,2\}", 1, 1),
    Case("set-list", W(r"\boxed{2, 1}"), "1, 2", 1, 1),
    Case("set-vs-braces", W(r"\boxed{\{1,2\}}"), "1,2", 1, 1),
    Case("set-missing", W(r"\boxed{1}"), "1, 2", 1, 0),
    Case("set-pm", W(r"\boxed{\pm 2}"), "-2, 2", 1, 1),
    Case("set-pm-label", W(r"\boxed{2}"), r"\pm 2", 1, 0),
    Case(
        "set-empty",
        W(r"\boxed{\emptyset}"),
        r"\varnothing",
        1,
        0,
        note="math-verify: \\emptyset != \\varnothing",
    ),
    # -- algebra
    Case("alg-expand", W(r"\boxed{2x+2}"), "2(x+1)", 1, 1),
    Case("alg-factor", W(r"\boxed{(x+1)^2}"), "x^2+2x+1", 1, 1),
    Case("alg-different", W(r"\boxed{x^2+1}"), "x^2-1", 1, 0),
    Case("alg-eq-vs-rhs", W(r"\boxed{y=2x+1}"), "2x+1", 1, 1),
    Case("alg-rhs-vs-eq", W(r"\boxed{2x+1}"), "y=2x+1", 1, 1),
    Case("alg-x-equals", W(r"\boxed{x=5}"), "5", 1, 1),
    Case("alg-rearranged-eq", W(r"\boxed{2x-y+1=0}"), "y=2x+1", 1, 1),
    Case(
        "alg-matrix",
        W(r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}"),
        r"\begin{pmatrix}1\\2\end{pmatrix}",
        1,
        1,
    ),
    Case("alg-complex", W(r"\boxed{3+4i}"), "3+4i", 1, 1),
    Case("alg-units-stripped", W(r"\boxed{10\text{ cm}}"), "10", 1, 1),
    Case(
        "alg-unit-conversion",
        W(r"\boxed{10\text{ m}}"),
        r"1000\text{ cm}",
        1,
        0,
        note="math-verify strips units without converting them",
    ),
    Case("alg-dollar-sign", W(r"\boxed{\$5}"), "5", 1, 1),
    Case("alg-text-yes", W(r"\boxed{\text{Yes}}"), "Yes", 1, 1),
    Case("alg-text-no", W(r"\boxed{\text{No}}"), "Yes", 1, 0),
    # -- where the answer comes from
    Case("src-bare-block", W("0.5"), r"\frac{1}{2}", 1, 1),
    Case("src-bare-block-dollars", W("$0.5$"), r"\frac{1}{2}", 1, 1),
    Case(
        "src-bare-block-sentence",
        W("The answer is 7"),
        "7",
        1,
        0,
        note="our rule: a sentence in <answer> needs \\boxed{} or $...$",
    ),
    Case("src-anchor-in-block", W("The final answer is $7$"), "7", 1, 1),
    Case(
        "src-think-box-ignored",
        "<think>maybe \\boxed{3}</think><answer>\\boxed{4}</answer>",
        "3",
        1,
        0,
    ),
    Case(
        "src-think-box-answer-right",
        "<think>maybe \\boxed{3}</think><answer>\\boxed{4}</answer>",
        "4",
        1,
        1,
    ),
    Case("src-no-block-boxed", r"Thus \boxed{12}.", "12", 0, 1),
    Case("src-no-block-bare", "12", "12", 0, 0),
    Case(
        "src-last-block",
        "<think>a</think><answer>\\boxed{1}</answer><answer>\\boxed{2}</answer>",
        "1",
        0,
        0,
    ),
    Case("src-hedge-two-boxes", W(r"\boxed{1} or \boxed{2}"), "1", 1, 0),
    Case("src-hedge-list", W(r"\boxed{1, 2, 3, 4, 5}"), "3", 1, 0),
    Case("src-empty-box", W(r"\boxed{}"), "1", 1, 0),
    Case("src-box-text-or", W(r"\boxed{1 \text{ or } 2}"), "2", 1, 0),
    # -- labels
    Case("lbl-already-dollar", W(r"\boxed{12}"), "$12$", 1, 1),
    Case("lbl-paren-delim", W(r"\boxed{12}"), r"\(12\)", 1, 1),
    Case("lbl-boxed", W(r"\boxed{12}"), r"\boxed{12}", 1, 1),
    Case("lbl-whitespace", W(r"\boxed{12}"), "  12 \n", 1, 1),
    Case("lbl-dollar-money", W(r"\boxed{5}"), "$5", 1, 1),
    Case("lbl-escaped-dollar", W(r"\boxed{5}"), r"\$5", 1, 1),
    Case("lbl-unit", W(r"\boxed{5}"), r"5\text{ cm}", 1, 1),
    Case("lbl-ratio", W(r"\boxed{\frac{3}{4}}"), "3:4", 1, 1),
    Case("lbl-time-like", W(r"\boxed{12:30}"), "12:30", 1, 1),
    Case(
        "lbl-e-notation",
        W(r"\boxed{0.001}"),
        "1e-3",
        1,
        0,
        note="math-verify reads 1e-3 as e - 3 (Euler's number)",
    ),
    Case("lbl-word", W(r"\boxed{\text{yes}}"), "yes", 1, 1),
    Case("lbl-empty", W(r"\boxed{1}"), "", 1, None),
    Case("lbl-dollars-only", W(r"\boxed{1}"), "$$", 1, None),
    Case("lbl-backslashes", W(r"\boxed{1}"), "\\\\\\", 1, None),
    Case(
        "lbl-brace",
        W(r"\boxed{1}"),
        "{",
        1,
        0,
        note="math-verify keeps '{' as a string-only label, compared as text",
    ),
    Case("lbl-none", W(r"\boxed{1}"), None, 1, None),
    # -- multiple choice
    Case("mc-letter", W("B"), "B", 1, 1),
    Case("mc-paren", W("(B)"), "B", 1, 1),
    Case("mc-label-paren", W("B"), "(B)", 1, 1),
    Case("mc-text", W(r"\text{B}"), "B", 1, 1),
    Case("mc-label-text", W("B"), r"\text{B}", 1, 1),
    Case("mc-boxed", W(r"\boxed{B}"), "B", 1, 1),
    Case("mc-boxed-text", W(r"\boxed{\text{(B)}}"), "B", 1, 1),
    Case("mc-with-option-text", W("B. 42"), "B", 1, 1),
    Case("mc-paren-option-text", W("(B) 42 apples"), "B", 1, 1),
    Case("mc-lowercase", W("b"), "B", 1, 1),
    Case("mc-wrong", W("C"), "B", 1, 0),
    Case("mc-hedge", W("A or B"), "B", 1, 0),
    Case("mc-hedge-boxed", W(r"\boxed{A, B}"), "B", 1, 0),
    Case("mc-answer-is", W("After checking, the answer is (B)."), "B", 1, 1),
    Case("mc-article-a", W("A triangle has three sides"), "A", 1, 0),
    Case("mc-no-block", r"I pick \boxed{D}", "D", 0, 1),
    Case("mc-multi-select", W("A, C"), "A,C", 1, 1, task="choice"),
    Case("mc-multi-compact", W(r"\boxed{CA}"), "AC", 1, 1, task="choice"),
    Case("mc-multi-partial", W("A"), "A, C", 1, 0, task="choice"),
    Case("mc-unparseable-label", W("A"), "42", 1, None, task="choice"),
    # -- numeric with tolerance
    Case("num-close", W(r"\boxed{3.14159}"), r"\pi", 1, 1, task="numeric"),
    Case("num-too-far", W(r"\boxed{3.14}"), r"\pi", 1, 0, task="numeric"),
    Case("num-rel", W(r"\boxed{100001}"), "100000", 1, 1, task="numeric"),
    Case("num-exact", W(r"\boxed{\frac{1}{3}}"), "0.3333333", 1, 1, task="numeric"),
    Case("num-pct", W(r"\boxed{12.5\%}"), "0.125", 1, 1, task="numeric"),
    Case("num-neg", W(r"\boxed{-2.00001}"), "-2", 1, 1, task="numeric"),
    Case("num-sign", W(r"\boxed{2}"), "-2", 1, 0, task="numeric"),
    Case("num-not-number", W(r"\boxed{x+1}"), "3", 1, 0, task="numeric"),
    Case("num-set-no-credit", W(r"\boxed{3.14159, 7}"), r"\pi", 1, 0, task="numeric"),
]


TABLE_CONFIG = {"profile": "lenient"}


@pytest.fixture(scope="module")
def inline_verifier() -> Iterator[Verifier]:
    config = VerifierConfig.model_validate({**TABLE_CONFIG, "pool": {"workers": 0}})
    with Verifier(config) as verifier:
        yield verifier


def _check(case: Case, result: Any) -> None:
    expected_accuracy = float(case.accuracy or 0)
    assert (result.format_score, result.accuracy_score) == (case.format, expected_accuracy), (
        f"{case.name}: got format={result.format_score} accuracy={result.accuracy_score} "
        f"({result.status}, extracted {result.extracted_answer!r})"
    )
    assert (result.status == "label_unparseable") == (case.accuracy is None), case.name
    assert result.reward == pytest.approx(0.5 * case.format + expected_accuracy)


def test_the_table_is_large_and_names_are_unique() -> None:
    assert len(CASES) >= 100
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case(case: Case, inline_verifier: Verifier) -> None:
    # Inline, in pytest's main thread: math-verify's own timeouts are active.
    [result] = inline_verifier.score([Sample(case.response, case.label, case.task)])
    _check(case, result)


def test_the_worker_pool_gives_the_same_rewards() -> None:
    config = VerifierConfig.model_validate({**TABLE_CONFIG, "pool": {"workers": 2}})
    with Verifier(config) as verifier:
        results = verifier.score([Sample(c.response, c.label, c.task) for c in CASES])
    for case, result in zip(CASES, results, strict=True):
        _check(case, result)


# The LMM-R1 reference (TideDra/lmm-r1 openrlhf/models/remote_rm/math_verifier.py),
# re-expressed: whole response, labels wrapped unless they start with "$", 1.0 when the
# label does not parse.
_REFERENCE_ANSWER_CONFIG = [
    LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            nits=False, malformed_operators=False, basic_latex=True, boxed="all", units=True
        ),
        boxed_match_priority=0,
        try_extract_without_anchor=False,
    )
]


def _reference_accuracy(response: str, label: str) -> float:
    if not label.startswith("$"):
        label = "$" + label + "$"
    gold = parse(label, extraction_mode="first_match", extraction_config=[LatexExtractionConfig()])
    if not gold:
        return 1.0
    answer = parse(
        response, extraction_config=_REFERENCE_ANSWER_CONFIG, extraction_mode="first_match"
    )
    try:
        return float(verify(answer, gold))
    except Exception:
        return 0.0


# The reference passes (answer, gold) to verify(), the reverse of math-verify's documented
# (gold, prediction) order; verify is not symmetric for inequalities against intervals.
REFERENCE_ORDER_DIFFERENCES = {"int-vs-ineq-answer", "int-vs-ineq-label"}


def test_the_default_profile_scores_every_math_row_as_the_lmm_r1_reference() -> None:
    compared = 0
    with Verifier(VerifierConfig(pool=PoolSettings(workers=0))) as verifier:
        for case in CASES:
            if case.label is None or case.task not in (None, "math"):
                continue
            # What the reference's extraction hands on: the response stripped.
            [ours] = verifier.score([Sample(case.response.strip(), case.label)])
            reference = _reference_accuracy(case.response.strip(), case.label)
            assert ours.accuracy_score == reference, case.name
            compared += 1
    assert compared >= 100


def test_gold_first_disagrees_with_the_reference_only_where_verify_is_asymmetric() -> None:
    # The full-response reading with math-verify's documented order: the reference scores
    # the same except on the rows where verify's asymmetry shows.
    config = VerifierConfig.model_validate(
        {"pool": {"workers": 0}, "accuracy": {"verify_order": "gold_first"}}
    )
    differences = set()
    with Verifier(config) as verifier:
        for case in CASES:
            if case.label is None or case.task not in (None, "math"):
                continue
            [ours] = verifier.score([Sample(case.response.strip(), case.label)])
            if ours.accuracy_score != _reference_accuracy(case.response.strip(), case.label):
                differences.add(case.name)
    assert differences == REFERENCE_ORDER_DIFFERENCES


# The versions the table above was checked against are pyproject.toml's exact pins of the
# verifier's math stack, in every extra that installs math-verify: the rewards depend on what
# math-verify, its LaTeX parser and sympy return, so another version must be re-checked (rerun
# every row, update the table, then the pins) before it can train anything. Read from there,
# so that the pins and this check cannot disagree.
CHECKED_PACKAGES = ("math-verify", "latex2sympy2-extended", "sympy")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions() -> dict[str, dict[str, str]]:
    """Per extra that declares math-verify: {package: version} of its `==` pins."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins: dict[str, dict[str, str]] = {}
    for extra, requirements in project.get("optional-dependencies", {}).items():
        found = {}
        for requirement in requirements:
            match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[[^]]*\])?\s*(.*?)\s*", requirement)
            assert match, requirement
            name, spec = _normalized(match.group(1)), match.group(2)
            if name in CHECKED_PACKAGES:
                assert spec.startswith("==") and "," not in spec, (
                    f"{extra}: {requirement} must pin one exact version"
                )
                found[name] = spec.removeprefix("==").strip()
        if "math-verify" in found:
            pins[extra] = found
    return pins


def test_every_extra_with_math_verify_pins_the_same_exact_versions() -> None:
    pins = pinned_versions()
    assert {"trainer", "verifier"} <= set(pins), pins
    for extra, found in pins.items():
        assert set(found) == set(CHECKED_PACKAGES), f"{extra} pins only {sorted(found)}"
    assert len({tuple(sorted(found.items())) for found in pins.values()}) == 1, pins


def test_the_installed_math_verify_is_the_version_the_table_was_checked_against() -> None:
    from importlib.metadata import version

    expected = pinned_versions()["verifier"]
    installed = {name: version(name) for name in expected}
    assert installed == expected, "installed math stack differs from pyproject.toml's pins"


def test_the_docs_name_the_pinned_versions() -> None:
    docs = (ROOT / "docs" / "verifier.md").read_text()
    for text in (docs, __doc__ or ""):
        for name, pinned in pinned_versions()["verifier"].items():
            assert f"{name.replace('-extended', '_extended')} {pinned}" in text, name
