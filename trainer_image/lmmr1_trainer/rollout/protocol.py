"""The rollout protocol (HTTP + JSON), shared by the server, its back ends and the client.

`POST /generate` takes chats (images inlined as `data:` URLs) and sampling settings and
returns, per prompt, the prompt's token ids and `n` samples with their token ids and
per-token log-probs (under the sampling temperature). `POST /update_weights` (bearer token)
takes a safetensors-serialised state dict. `GET /health`, `GET /metrics`.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

WEIGHT_VERSION_HEADER = "X-Weight-Version"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingParams(_Message):
    n: int = Field(default=1, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=256, ge=1)
    seed: int | None = None


class GenerateRequest(_Message):
    prompts: list[list[dict[str, Any]]] = Field(min_length=1)
    sampling: SamplingParams = SamplingParams()
    # The index of `prompts[0]` in the step's whole batch: sample j of prompt i is drawn
    # with `sample_seed(sampling.seed, first_index + i, j)`, so the samples are the same
    # whichever server or rank generates which share.
    first_index: int = Field(default=0, ge=0)


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The seed of one prompt's samples: distinct per (step seed, prompt), the same in every
    process (no Python hash randomisation); 62 bits, so `+ sample_index` stays in 63."""
    raw = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8)
    return int.from_bytes(raw.digest(), "big") >> 2


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sample: the prompt's seed plus the sample's index, as vLLM seeds the
    samples of one request with `n` of them (so an engine can draw a prompt's samples in
    one request: its image and prompt are processed once, not `n` times)."""
    return prompt_seed(seed, prompt_index) + sample_index


class Sample(_Message):
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: Literal["stop", "length"]


class PromptResult(_Message):
    prompt_token_ids: list[int]
    samples: list[Sample]


class GenerateResponse(_Message):
    results: list[PromptResult]
    weight_version: int


class WeightUpdateResponse(_Message):
    weight_version: int
    tensors: int


class NcclInitRequest(_Message):
    """GPU weight sync: join the trainer's NCCL group (the trainer is rank 0)."""

    master_address: str
    master_port: int
    rank_offset: int = Field(ge=1)
    world_size: int = Field(ge=2)


class NcclUpdateRequest(_Message):
    """GPU weight sync: receive these tensors, in this order, by broadcast from rank 0."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    weight_version: int


class Rollouts(Protocol):
    """What the trainer's rank 0 generates with: rollout servers (`RolloutClient`) or the
    ranks' colocated engines (`ColocatedRollout`)."""

    def generate(
        self, prompts: list[list[dict[str, Any]]], sampling: SamplingParams
    ) -> tuple[list[PromptResult], int]:
        """Results in prompt order, and the (oldest) weight version that drew them."""
        ...
