"""Request and response bodies of the HTTP endpoints (validated with pydantic).

`POST /get_reward` is the OpenRLHF / LMM-R1 contract:
`{"query": [...], "prompts": [...], "labels": [...]}` →
`{"rewards": [...], "format_rewards": [...], "acc_rewards": [...]}` plus two 0/1 lists,
`label_unparseable` and `timed_out`, that mark samples whose accuracy could not be judged
(integers, so clients that turn every key into a tensor keep working). `format_rewards` and
`acc_rewards` are weighted (0.5 / 1.0 by default) and `rewards` is their sum, as in LMM-R1.

`POST /v1/rewards` is the richer form: per-sample task, response or query, and a per-reward
breakdown with status, flags and the extracted answer.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    model_validator,
)

from lmmr1_trainer.verifier.config import PromptTemplate
from lmmr1_trainer.verifier.rewards import SampleResult


def _label_text(value: Any) -> Any:
    """Numbers in datasets are labels too: 0.5 → "0.5", 1e-05 → "0.00001" (never "1e-05",
    which LaTeX parsing reads as e - 5). Other types are left for validation to reject."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return format(Decimal(repr(value)), "f")
    return value


Label = Annotated[StrictStr | None, BeforeValidator(_label_text)]


class GetRewardRequest(BaseModel):
    """The OpenRLHF / LMM-R1 request. Unknown keys are ignored (forks add their own)."""

    model_config = ConfigDict(extra="ignore")

    query: list[StrictStr]
    prompts: list[StrictStr | None] | None = None
    labels: list[Label]

    @model_validator(mode="after")
    def _same_lengths(self) -> GetRewardRequest:
        if len(self.labels) != len(self.query):
            raise ValueError(f"labels has {len(self.labels)} items but query has {len(self.query)}")
        if self.prompts is not None and len(self.prompts) != len(self.query):
            raise ValueError(
                f"prompts has {len(self.prompts)} items but query has {len(self.query)}"
            )
        return self


class GetRewardResponse(BaseModel):
    rewards: list[float]
    format_rewards: list[float]
    acc_rewards: list[float]
    label_unparseable: list[int]
    timed_out: list[int]

    @classmethod
    def from_results(cls, results: list[SampleResult]) -> GetRewardResponse:
        return cls(
            rewards=[r.reward for r in results],
            format_rewards=[r.format_reward for r in results],
            acc_rewards=[r.accuracy_reward for r in results],
            label_unparseable=[int(r.status == "label_unparseable") for r in results],
            timed_out=[int(r.status == "timeout") for r in results],
        )


class RewardSample(BaseModel):
    """One sample of `/v1/rewards`: exactly one of `response` and `query`."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr | None = Field(default=None, max_length=256)
    response: StrictStr | None = None
    query: StrictStr | None = None
    label: Label
    task: StrictStr | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _one_text(self) -> RewardSample:
        if (self.response is None) == (self.query is None):
            raise ValueError("give exactly one of response (the model's text) or query")
        return self


class RewardsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: list[RewardSample]
    # How to find the response in `query` samples; default: the server's --prompt-template.
    prompt_template: PromptTemplate | None = None


class RewardBreakdown(BaseModel):
    format: float
    accuracy: float


class RewardResult(BaseModel):
    id: str | None
    reward: float
    rewards: RewardBreakdown  # weighted
    scores: RewardBreakdown  # raw, before weights (accuracy after the label policy)
    task: str
    status: str
    flags: list[str]
    skip: bool  # the accuracy does not measure the model (label, timeout, error)
    extracted_answer: str | None
    detail: str | None

    @classmethod
    def from_result(cls, sample_id: str | None, result: SampleResult) -> RewardResult:
        return cls(
            id=sample_id,
            reward=result.reward,
            rewards=RewardBreakdown(format=result.format_reward, accuracy=result.accuracy_reward),
            scores=RewardBreakdown(format=result.format_score, accuracy=result.accuracy_score),
            task=result.task,
            status=result.status.value,
            flags=list(result.flags),
            skip=result.skip,
            extracted_answer=result.extracted_answer,
            detail=result.detail,
        )


class RewardsSummary(BaseModel):
    count: int
    mean_reward: float
    mean_accuracy: float
    skipped: int
    elapsed_s: float


class RewardsResponse(BaseModel):
    results: list[RewardResult]
    summary: RewardsSummary
    weights: RewardBreakdown
    profile: str
    unparseable_label_policy: str


class ErrorResponse(BaseModel):
    error: str
    status: int
