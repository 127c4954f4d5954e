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

    `zero` (default): no credit for something nobody can check; the group's accuracy is then
    constant, so a group baseline gives it zero advantage, and logged accuracy is not inflated.
    `one`: the LMM-R1 reference behaviour (every sample of the group gets 1.0).
    Either way the sample is flagged `label_unparseable`.
    """

    ZERO = "zero"
    ONE = "one"


class AnswerSource(StrEnum):
    """Which text the accuracy reward reads.

    `answer_block` (default): the content of the last `<answer>…</answer>` block, or the whole
    response when there is none; a bare block without `\\boxed{}` is read as a LaTeX expression.
    `full_response`: exactly the reference (the whole response, boxed/anchored answers only).
    """

    ANSWER_BLOCK = "answer_block"
    FULL_RESPONSE = "full_response"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RewardWeights(_Model):
    """Weights of the named rewards; the total reward is their weighted sum (paper: 0.5 + 1.0)."""

    format: float = Field(default=0.5, ge=0.0, le=100.0)
    accuracy: float = Field(default=1.0, ge=0.0, le=100.0)


class FormatSettings(_Model):
    """The format rule; defaults follow the LMM-R1 reference regex exactly."""

    allow_whitespace_between_blocks: bool = False


class AccuracySettings(_Model):
    """How answers are extracted and compared; sent to every worker process."""

    default_task: str = Field(default="auto", min_length=1, max_length=64)
    answer_source: AnswerSource = AnswerSource.ANSWER_BLOCK
    # math-verify's own per-call timeout (signal.alarm, whole seconds, worker main thread).
    math_timeout_s: int = Field(default=5, ge=1, le=120)
    float_rounding: int = Field(default=6, ge=1, le=15)
    numeric_rel_tol: float = Field(default=1e-4, ge=0.0, le=1.0)
    numeric_abs_tol: float = Field(default=1e-8, ge=0.0)
    # A bare `<answer>` block longer than this is not read as a LaTeX expression.
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
    """Everything the verifier sidecar needs; every field has a documented default."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=5000, ge=0, le=65535)
    prompt_template: PromptTemplate = PromptTemplate.CHATML
    unparseable_label_policy: UnparseableLabelPolicy = UnparseableLabelPolicy.ZERO
    weights: RewardWeights = RewardWeights()
    format: FormatSettings = FormatSettings()
    accuracy: AccuracySettings = AccuracySettings()
    limits: Limits = Limits()
    pool: PoolSettings = PoolSettings()
    # Modules imported at start (in the server and every worker) that register verifiers.
    plugins: tuple[str, ...] = ()

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
