"""Weights, the unparseable-label policy, task routing, typed config and the wire models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from lmmr1_trainer.verifier.__main__ import build_parser, config_from_args, main
from lmmr1_trainer.verifier.choice import is_single_choice_label
from lmmr1_trainer.verifier.config import (
    ConfigError,
    PoolSettings,
    RewardWeights,
    UnparseableLabelPolicy,
    VerifierConfig,
    describe_validation_error,
    load_config,
)
from lmmr1_trainer.verifier.engine import Sample, Verifier
from lmmr1_trainer.verifier.protocol import GetRewardRequest, GetRewardResponse, RewardsRequest
from lmmr1_trainer.verifier.rewards import (
    AccuracyOutcome,
    AccuracyReward,
    AccuracyStatus,
    FormatReward,
    combine,
)

GOOD = r"<think>t</think><answer>\boxed{3}</answer>"


def _inline(**fields: object) -> Verifier:
    return Verifier(VerifierConfig.model_validate({"pool": {"workers": 0}, **fields}))


def test_the_paper_weights_by_default() -> None:
    results = _inline().score(
        [
            Sample(GOOD, "3"),
            Sample(GOOD, "4"),
            Sample(r"\boxed{3}", "3"),
            Sample("nothing", "3"),
        ]
    )
    assert [(r.format_reward, r.accuracy_reward, r.reward) for r in results] == [
        (0.5, 1.0, 1.5),
        (0.5, 0.0, 0.5),
        (0.0, 1.0, 1.0),
        (0.0, 0.0, 0.0),
    ]


def test_custom_weights_scale_each_reward() -> None:
    verifier = _inline(weights={"format": 0.2, "accuracy": 2.0})
    [result] = verifier.score([Sample(GOOD, "3")])
    assert (result.format_reward, result.accuracy_reward) == (0.2, 2.0)
    assert (result.format_score, result.accuracy_score) == (1.0, 1.0)
    assert result.reward == pytest.approx(2.2)


@pytest.mark.parametrize(
    ("policy", "accuracy"), [(UnparseableLabelPolicy.ZERO, 0.0), (UnparseableLabelPolicy.ONE, 1.0)]
)
def test_unparseable_labels_follow_the_policy_and_are_flagged(
    policy: UnparseableLabelPolicy, accuracy: float
) -> None:
    verifier = _inline(unparseable_label_policy=policy.value)
    for label in ("", "$$", None):
        [result] = verifier.score([Sample(GOOD, label)])
        assert result.accuracy_score == accuracy
        assert result.reward == 0.5 + accuracy
        assert result.status == "label_unparseable"
        assert result.flags == ("label_unparseable",) and result.skip


def test_the_policy_defaults_to_the_profiles() -> None:
    assert VerifierConfig().unparseable_label_policy is UnparseableLabelPolicy.ONE  # lmm-r1
    for profile in ("strict", "lenient"):
        config = VerifierConfig.model_validate({"profile": profile})
        assert config.unparseable_label_policy is UnparseableLabelPolicy.ZERO
    overridden = VerifierConfig.model_validate(
        {"profile": "strict", "unparseable_label_policy": "one"}
    )
    assert overridden.unparseable_label_policy is UnparseableLabelPolicy.ONE


def test_timeouts_and_errors_never_earn_accuracy() -> None:
    reward = AccuracyReward(1.0, UnparseableLabelPolicy.ONE)
    for status in (AccuracyStatus.TIMEOUT, AccuracyStatus.ERROR, AccuracyStatus.NO_ANSWER):
        result = combine(FormatReward(0.5), reward, 1.0, AccuracyOutcome(1.0, status), "math")
        assert (result.accuracy_score, result.reward) == (0.0, 0.5)


@pytest.mark.parametrize(
    ("label", "choice"),
    [
        ("B", True),
        ("(B)", True),
        (r"\text{B}", True),
        ("$B$", True),
        ("B.", True),
        ("b", False),  # a lowercase letter is more likely a variable
        ("AB", False),
        ("42", False),
        ("x+1", False),
        (None, False),
    ],
)
def test_auto_routes_single_uppercase_letters_to_choice(label: str | None, choice: bool) -> None:
    assert is_single_choice_label(label) is choice
    auto = _inline(profile="lenient")  # lmm-r1 sends every label to math, as the reference
    assert auto.resolve_task(None, label) == ("choice" if choice else "math")
    assert _inline().resolve_task(None, label) == "math"


def test_an_explicit_task_wins_over_auto() -> None:
    verifier = _inline(profile="lenient")
    assert verifier.resolve_task("numeric", "B") == "numeric"
    [result] = verifier.score([Sample(GOOD, "3", task="nonexistent")])
    assert (result.status, result.reward) == ("error", 0.5)


def test_answer_source_full_response_reads_the_whole_response() -> None:
    response = r"<think>maybe \boxed{3}</think><answer>0.5</answer>"
    [block] = _inline(profile="lenient").score([Sample(response, "0.5")])
    overridden = _inline(profile="lenient", accuracy={"answer_source": "full_response"})
    [full] = overridden.score([Sample(response, "0.5")])
    assert (block.accuracy_score, full.accuracy_score) == (1.0, 0.0)
    [default] = _inline().score([Sample(response, "0.5")])
    assert default.accuracy_score == 0.0  # lmm-r1 reads the whole response


# -- configuration -----------------------------------------------------------------------------


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"weights\.format: Input should be greater than"):
        load_config(overrides={"weights": {"format": -1}})
    with pytest.raises(ConfigError, match=r"pool\.workrs: Extra inputs are not permitted"):
        load_config(overrides={"pool": {"workrs": 2}})
    with pytest.raises(ConfigError, match=r"limits\.sample_timeout_s .* accuracy\.math_timeout_s"):
        load_config(overrides={"limits": {"sample_timeout_s": 1}})
    path = tmp_path / "verifier.yaml"
    path.write_text("prompt_template: chatnl\n")
    with pytest.raises(ConfigError, match="prompt_template: Input should be 'chatml'"):
        load_config(path)


def test_a_bare_answer_limit_without_answer_block_reading_is_refused() -> None:
    # max_bare_answer_chars only means something when the <answer> block is read: with the
    # profile's full-response reading it would be silently ignored.
    message = r"accuracy\.max_bare_answer_chars: applies only when accuracy\.answer_source"
    refused: list[dict[str, Any]] = [
        {"accuracy": {"max_bare_answer_chars": 64}},
        {"profile": "strict", "accuracy": {"max_bare_answer_chars": 64}},
        {
            "profile": "lenient",
            "accuracy": {"max_bare_answer_chars": 64, "answer_source": "full_response"},
        },
    ]
    for overrides in refused:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides=overrides)
    accepted: list[dict[str, Any]] = [
        {"profile": "lenient", "accuracy": {"max_bare_answer_chars": 64}},
        {"accuracy": {"max_bare_answer_chars": 64, "answer_source": "answer_block"}},
    ]
    for overrides in accepted:
        assert load_config(overrides=overrides).accuracy.max_bare_answer_chars == 64
    with pytest.raises(ConfigError, match="profile: Input should be 'lmm-r1', 'strict' or"):
        load_config(overrides={"profile": "reference"})


def test_the_profile_flag_sets_every_default_and_other_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "verifier.yaml"
    path.write_text("profile: lenient\naccuracy: {verify_order: answer_first}\n")
    args = build_parser().parse_args(["--config", str(path), "--unparseable-label-policy", "one"])
    config = config_from_args(args)
    assert config.profile == "lenient"
    assert (config.accuracy.answer_source, config.accuracy.verify_order) == (
        "answer_block",
        "answer_first",
    )
    assert config.unparseable_label_policy == "one"
    flagged = config_from_args(
        build_parser().parse_args(["--config", str(path), "--profile", "lmm-r1"])
    )
    assert (flagged.profile, flagged.accuracy.answer_source) == ("lmm-r1", "full_response")
    assert flagged.accuracy.verify_order == "answer_first"


def test_config_file_and_flags_merge_flags_winning(tmp_path: Path) -> None:
    path = tmp_path / "verifier.json"
    path.write_text(json.dumps({"port": 7000, "limits": {"max_batch_size": 8}, "pool": {}}))
    args = build_parser().parse_args(
        [
            "--config",
            str(path),
            "--port",
            "7001",
            "--workers",
            "1",
            "--plugin",
            "a",
            "--plugin",
            "b",
        ]
    )
    config = config_from_args(args)
    assert (config.port, config.limits.max_batch_size, config.pool.workers) == (7001, 8, 1)
    assert config.plugins == ("a", "b")
    assert config.host == "127.0.0.1"


def test_defaults_are_the_documented_ones() -> None:
    config = VerifierConfig()
    assert config.weights == RewardWeights(format=0.5, accuracy=1.0)
    assert (config.host, config.port, config.prompt_template) == ("127.0.0.1", 5000, "chatml")
    assert config.pool == PoolSettings(workers=2, worker_memory_mb=2048, start_timeout_s=60.0)
    assert config.limits.request_deadline_s < 180  # OpenRLHF's client gives up at 180 s


# -- wire models -------------------------------------------------------------------------------


def test_get_reward_request_accepts_numbers_as_labels() -> None:
    request = GetRewardRequest.model_validate(
        {"query": ["a", "b", "c", "d"], "prompts": ["p"] * 4, "labels": [3, 0.5, 1e-05, None]}
    )
    assert request.labels == ["3", "0.5", "0.00001", None]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"query": ["a"]}, "labels: Field required"),
        ({"query": ["a"], "labels": [True]}, "labels.0: Input should be a valid string"),
        ({"query": ["a"], "labels": [[1]]}, "labels.0: Input should be a valid string"),
        ({"query": ["a", "b"], "labels": ["1"]}, "labels has 1 items but query has 2"),
        ({"query": ["a"], "prompts": [], "labels": ["1"]}, "prompts has 0 items"),
        ({"query": "a", "labels": ["1"]}, "query: Input should be a valid list"),
    ],
)
def test_get_reward_request_errors_name_the_field(body: object, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        GetRewardRequest.model_validate(body)
    assert message in describe_validation_error(caught.value)


def test_rewards_request_needs_exactly_one_text() -> None:
    with pytest.raises(ValidationError) as caught:
        RewardsRequest.model_validate({"samples": [{"label": "1"}]})
    assert "samples.0: give exactly one of response" in describe_validation_error(caught.value)


def test_get_reward_response_shape() -> None:
    results = _inline().score([Sample(GOOD, "3"), Sample(GOOD, ""), Sample(GOOD, "4")])
    body = json.loads(GetRewardResponse.from_results(results).model_dump_json())
    assert body == {
        "rewards": [1.5, 1.5, 0.5],  # lmm-r1: an unparseable label earns 1.0, flagged
        "format_rewards": [0.5, 0.5, 0.5],
        "acc_rewards": [1.0, 1.0, 0.0],
        "label_unparseable": [0, 1, 0],
        "timed_out": [0, 0, 0],
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--format-weight", "-1"], "weights.format: Input should be greater than or equal to 0"),
        (["--workers", "0"], "pool.workers: the service needs at least 1 worker"),
        (["--profile", "reference"], "argument --profile: invalid choice: 'reference'"),
        (["--sample-timeout-s", "1"], "limits.sample_timeout_s (1.0) must be at least"),
        (["--plugin", "no_such_verifier_plugin"], "cannot import verifier plug-in"),
    ],
)
def test_the_command_refuses_bad_settings_naming_the_field(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--port", "0", *argv]) == 78  # EX_CONFIG: the operator fails the stage at once
    assert message in capsys.readouterr().err
