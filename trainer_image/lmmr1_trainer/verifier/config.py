"""Typed configuration of the rule-based verifier (pure pydantic: safe to import anywhere).

The operator renders this model into the trainer pod (as a JSON/YAML file passed with
`--config`, or as command-line flags); the sidecar validates it on start and stops with a
message that names the offending field.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class PromptTemplate(StrEnum):
    """How to find the model's response inside the chat-templated `query` of `/get_reward`."""

    CHATML = "chatml"
    QWEN1 = "qwen1"
    BASE = "base"
    PHI3 = "phi3"
    PHI4 = "phi4"
    GEMMA3 = "gemma3"
    NONE = "none"  # the query is the response itself


class UnparseableLabelPolicy(StrEnum):
    """What accuracy a sample earns when its label cannot be parsed.

    `one`: the LMM-R1 reference behaviour (every sample of the group gets 1.0).
    `zero`: no credit for something nobody can check; the group's accuracy is then constant,
    so a group baseline gives it zero advantage, and logged accuracy is not inflated.
    Either way the sample is flagged `label_unparseable`. The profile chooses the default.
    """

    ZERO = "zero"
    ONE = "one"


class AnswerSource(StrEnum):
    """Which text the accuracy reward reads.

    `full_response`: the reference (the whole response, boxed/anchored answers only).
    `answer_block`: the content of the last `<answer>…</answer>` block, or the whole response
    when there is none; a bare block without `\\boxed{}` is read as a LaTeX expression.
    """

    ANSWER_BLOCK = "answer_block"
    FULL_RESPONSE = "full_response"


class ResponseExtraction(StrEnum):
    """How the response is cut out of a chat-templated query (see `templates.py`).

    `reference`: the LMM-R1 reference: the text after the first match of the template's
    marker (a regular expression, as the reference writes it), its four end tokens deleted
    wherever they are, stripped; when there is no marker or nothing is left, the raw query.
    `last_marker`: the text after the last marker, trailing end/padding tokens and
    surrounding whitespace stripped; without a marker, the query stripped the same way.
    """

    REFERENCE = "reference"
    LAST_MARKER = "last_marker"


class FormatRule(StrEnum):
    """What a well-formed response is (see `format.py`).

    `reference`: the reference regex on the response as extracted (`<think>` and `<answer>`
    once each; a stray `</think>` in the answer or `</answer>` in the thinking passes).
    `exact_tags`: after stripping, exactly `<think>…</think><answer>…</answer>` with each of
    the four tags once.
    """

    REFERENCE = "reference"
    EXACT_TAGS = "exact_tags"


class LabelWrapping(StrEnum):
    """How a label becomes LaTeX math before it is parsed (see `accuracy.wrap_label`).

    `reference`: wrapped in `$…$` unless it starts with `$` (as is, not stripped).
    `delimiters`: stripped, then wrapped unless already delimited (`$…$`, `\\(`, `\\[`).
    """

    REFERENCE = "reference"
    DELIMITERS = "delimiters"


class VerifyOrder(StrEnum):
    """The argument order of math-verify's asymmetric `verify(gold, target)`.

    `answer_first`: the reference, `verify(answer, label)`: an inequality answer matches an
    interval label, an answer `1+1=2` does not match the label `2`.
    `gold_first`: as math-verify documents, `verify(label, answer)`: the reverse.
    """

    ANSWER_FIRST = "answer_first"
    GOLD_FIRST = "gold_first"


class RewardProfile(StrEnum):
    """A named set of defaults for every scoring rule (`PROFILE_DEFAULTS`).

    `lmm-r1` (default): the LMM-R1 reference reward server, rule for rule.
    `strict`: the reference's reading of the answer (whole response, anchored LaTeX only)
    with this project's corrections: no credit for unparseable labels, math-verify's
    documented argument order, exact tags, the last assistant marker, delimiter-aware labels,
    `auto` task routing (letters to `choice`).
    `lenient`: `strict`, but the answer is read from the `<answer>` block, where a bare
    expression counts (`<answer>2</answer>`).
    """

    LMM_R1 = "lmm-r1"
    STRICT = "strict"
    LENIENT = "lenient"


# The settings a profile governs, as (section, field); section None: a top-level field.
# PROFILE_DEFAULTS gives each profile's value by field name; one given explicitly wins.
_PROFILE_FIELDS: tuple[tuple[str | None, str], ...] = (
    (None, "response_extraction"),
    (None, "unparseable_label_policy"),
    ("format", "rule"),
    ("accuracy", "answer_source"),
    ("accuracy", "label_wrapping"),
    ("accuracy", "verify_order"),
    ("accuracy", "default_task"),
)
_STRICT: dict[str, str] = {
    "response_extraction": ResponseExtraction.LAST_MARKER,
    "unparseable_label_policy": UnparseableLabelPolicy.ZERO,
    "rule": FormatRule.EXACT_TAGS,
    "answer_source": AnswerSource.FULL_RESPONSE,
    "label_wrapping": LabelWrapping.DELIMITERS,
    "verify_order": VerifyOrder.GOLD_FIRST,
    "default_task": "auto",
}
PROFILE_DEFAULTS: dict[RewardProfile, dict[str, str]] = {
    RewardProfile.LMM_R1: {
        "response_extraction": ResponseExtraction.REFERENCE,
        "unparseable_label_policy": UnparseableLabelPolicy.ONE,
        "rule": FormatRule.REFERENCE,
        "answer_source": AnswerSource.FULL_RESPONSE,
        "label_wrapping": LabelWrapping.REFERENCE,
        "verify_order": VerifyOrder.ANSWER_FIRST,
        "default_task": "math",
    },
    RewardProfile.STRICT: _STRICT,
    RewardProfile.LENIENT: {**_STRICT, "answer_source": AnswerSource.ANSWER_BLOCK},
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RewardWeights(_Model):
    """Weights of the named rewards; the total reward is their weighted sum (paper: 0.5 + 1.0)."""

    format: float = Field(default=0.5, ge=0.0, le=100.0)
    accuracy: float = Field(default=1.0, ge=0.0, le=100.0)


class FormatSettings(_Model):
    """The format rule; `rule` defaults to the profile's (field defaults: `lmm-r1`'s)."""

    rule: FormatRule = FormatRule.REFERENCE
    allow_whitespace_between_blocks: bool = False


class AccuracySettings(_Model):
    """How answers are extracted and compared; sent to every worker process.

    `default_task`, `answer_source`, `label_wrapping` and `verify_order` default to the
    profile's (the field defaults here are `lmm-r1`'s, for use without a `VerifierConfig`).
    """

    default_task: str = Field(default="math", min_length=1, max_length=64)
    answer_source: AnswerSource = AnswerSource.FULL_RESPONSE
    label_wrapping: LabelWrapping = LabelWrapping.REFERENCE
    verify_order: VerifyOrder = VerifyOrder.ANSWER_FIRST
    # math-verify's own per-call timeout (signal.alarm, whole seconds, worker main thread).
    math_timeout_s: int = Field(default=5, ge=1, le=120)
    float_rounding: int = Field(default=6, ge=1, le=15)
    numeric_rel_tol: float = Field(default=1e-4, ge=0.0, le=1.0)
    numeric_abs_tol: float = Field(default=1e-8, ge=0.0)
    # A bare `<answer>` block longer than this is not read as a LaTeX expression
    # (`answer_source: answer_block` only).
    max_bare_answer_chars: int = Field(default=256, ge=1, le=65536)


class Limits(_Model):
    """Bounds that keep one request from hanging or exhausting the sidecar."""

    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_batch_size: int = Field(default=4096, ge=1)
    max_response_chars: int = Field(default=65536, ge=16)
    # Hard wall-clock limit per sample, enforced by the parent (kills the worker).
    sample_timeout_s: float = Field(default=15.0, gt=0.0, le=600.0)
    # Whole-request limit; below OpenRLHF's 180 s client timeout so a reply always arrives.
    request_deadline_s: float = Field(default=150.0, gt=0.0, le=3600.0)
    # Socket read timeout for one HTTP request body.
    read_timeout_s: float = Field(default=60.0, gt=0.0, le=3600.0)


class PoolSettings(_Model):
    """The worker processes that run math-verify (0 workers: inline, no wall-clock limit)."""

    workers: int = Field(default=2, ge=0, le=256)
    worker_memory_mb: int | None = Field(default=2048, ge=256)
    start_timeout_s: float = Field(default=60.0, gt=0.0)


class VerifierConfig(_Model):
    """Everything the verifier sidecar needs; every field has a documented default.

    `profile` decides the default of every scoring rule (`PROFILE_DEFAULTS`); a rule given
    explicitly overrides it (the field defaults below are `lmm-r1`'s).
    """

    profile: RewardProfile = RewardProfile.LMM_R1
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=5000, ge=0, le=65535)
    prompt_template: PromptTemplate = PromptTemplate.CHATML
    response_extraction: ResponseExtraction = ResponseExtraction.REFERENCE
    unparseable_label_policy: UnparseableLabelPolicy = UnparseableLabelPolicy.ONE
    weights: RewardWeights = RewardWeights()
    format: FormatSettings = FormatSettings()
    accuracy: AccuracySettings = AccuracySettings()
    limits: Limits = Limits()
    pool: PoolSettings = PoolSettings()
    # Modules imported at start (in the server and every worker) that register verifiers.
    plugins: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        """Fill every rule the input leaves out from the profile; reject incoherent input."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        try:
            profile = RewardProfile(data.get("profile", RewardProfile.LMM_R1))
        except (TypeError, ValueError):
            return data  # field validation names the bad profile
        defaults = PROFILE_DEFAULTS[profile]
        for section, name in _PROFILE_FIELDS:
            if section is None:
                data.setdefault(name, defaults[name])
                continue
            given = _explicit(data.get(section, {}))
            if given is None:
                continue  # not a mapping: field validation reports it
            given.setdefault(name, defaults[name])
            data[section] = given
        accuracy = data.get("accuracy")
        if (
            isinstance(accuracy, dict)
            and "max_bare_answer_chars" in accuracy
            and accuracy["answer_source"] != AnswerSource.ANSWER_BLOCK
        ):
            raise ValueError(
                "accuracy.max_bare_answer_chars: applies only when accuracy.answer_source is "
                f"answer_block (here {accuracy['answer_source']}, profile {profile.value}); "
                "remove it, or set accuracy.answer_source: answer_block"
            )
        return data

    @model_validator(mode="after")
    def _timeouts_nest(self) -> VerifierConfig:
        if self.limits.sample_timeout_s < self.accuracy.math_timeout_s:
            raise ValueError(
                f"limits.sample_timeout_s ({self.limits.sample_timeout_s}) must be at least "
                f"accuracy.math_timeout_s ({self.accuracy.math_timeout_s}): otherwise every "
                "slow sample kills a worker instead of timing out inside it"
            )
        if self.limits.request_deadline_s < self.limits.sample_timeout_s:
            raise ValueError(
                f"limits.request_deadline_s ({self.limits.request_deadline_s}) must be at "
                f"least limits.sample_timeout_s ({self.limits.sample_timeout_s})"
            )
        return self


def _explicit(section: Any) -> dict[str, Any] | None:
    """The settings given explicitly in a section (a mapping or an already-built model)."""
    if isinstance(section, BaseModel):
        return section.model_dump(exclude_unset=True)
    if isinstance(section, dict):
        return dict(section)
    return None


class ConfigError(ValueError):
    """A configuration that does not validate; the message names the field and the problem."""


def describe_validation_error(error: ValidationError, prefix: str = "") -> str:
    """One line per problem, each starting with the dotted field path."""
    lines = []
    for item in error.errors(include_url=False):
        path = ".".join(str(part) for part in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        lines.append(f"{prefix}{path}: {message}" if path else f"{prefix}{message}")
    return "; ".join(lines)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: Path | None = None, overrides: dict[str, Any] | None = None
) -> VerifierConfig:
    """Read a JSON/YAML file (optional), apply nested overrides, validate.

    Raises ConfigError with a message naming each bad field.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
            loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read verifier config {path}: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"verifier config {path}: the top level must be a mapping")
        data = loaded
    data = _merge(data, overrides or {})
    try:
        return VerifierConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, prefix="verifier config: ")) from exc
