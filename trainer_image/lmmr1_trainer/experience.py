"""From prompts to scored samples (rank 0), and from samples to token advantages (every rank).

`collect_rollout` asks the rollout servers for `samples_per_prompt` responses per prompt,
scores them with the verifier (OpenRLHF payload) and applies the group baseline.
`prepare_micro_batches` computes, on each rank's share, the old policy's and the reference's
log-probs, the KL penalty and the returns; `whiten_across_ranks` then normalises the
advantages over the whole rollout batch (all ranks), as OpenRLHF does.

With `gae` the preparation also asks the critic for its values of the response tokens, and
the advantages are GAE's (returns = advantages + values, the critic's targets), whitened in
the same way.

When a rollout feeds exactly one optimizer update and the KL is a loss term (not part of the
reward), the policy cannot change between the old-log-prob pass and the loss, so the old
log-probs equal the update's own, detached: `old_log_probs_from_update` says so, the
preparation skips that forward pass and the update fills them in (TRL does the same).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmmr1_trainer.algorithms import (
    KLEstimator,
    approx_kl,
    cumulative_returns,
    gae_advantages,
    group_baseline,
    masked_mean,
    token_rewards,
)
from lmmr1_trainer.collectives import all_reduce_sum
from lmmr1_trainer.config import AlgorithmConfig, CriticConfig, RewardConfig
from lmmr1_trainer.critic import response_values
from lmmr1_trainer.data import ImageLoader, PromptRow, decode_images
from lmmr1_trainer.models import (
    ChatEncoder,
    SequenceBatch,
    build_sequence_batch,
    response_log_probs,
)
from lmmr1_trainer.rollout.client import RewardClient
from lmmr1_trainer.rollout.protocol import Rollouts, SamplingParams


@dataclass
class ScoredSample:
    prompt: dict[str, Tensor]  # encoded prompt (input_ids, pixel_values, image_grid_thw)
    response: list[int]
    reward: float
    accuracy: float
    shaped_reward: float = 0.0  # after the group baseline


@dataclass
class RolloutStats:
    reward: float
    accuracy: float | None
    format_reward: float
    response_length: float
    generated_tokens: int
    seconds: float  # the whole rollout: generation, prompt encoding, scoring
    weight_version: int
    generate_seconds: float = 0.0  # the rollout servers' round trip
    reward_seconds: float = 0.0  # the verifier's round trip


def truncate_at(tokens: list[int], forbidden: set[int]) -> list[int]:
    """The response up to its first forbidden token (a server that ignored the ban)."""
    for i, token in enumerate(tokens):
        if token in forbidden:
            return tokens[:i]
    return tokens


def collect_rollout(
    rows: list[PromptRow],
    client: Rollouts,
    verifier: RewardClient,
    encoder: ChatEncoder,
    images: ImageLoader,
    algo: AlgorithmConfig,
    reward: RewardConfig,
    seed: int,
) -> tuple[list[ScoredSample], RolloutStats]:
    started = time.monotonic()
    sampling = SamplingParams(
        n=algo.samples_per_prompt,
        temperature=algo.temperature,
        top_p=algo.top_p,
        max_tokens=algo.max_generation_length,
        seed=seed,
    )
    results, version = client.generate([images.inline(r.messages) for r in rows], sampling)
    generate_seconds = time.monotonic() - started
    forbidden = set(encoder.vision_token_ids)
    samples: list[ScoredSample] = []
    queries: list[str] = []
    prompts: list[str] = []
    labels: list[str] = []
    for row, result in zip(rows, results, strict=True):
        encoded = encoder.encode(row.messages, decode_images(row.messages, images))
        length = int(encoded["input_ids"].shape[-1])
        if length > algo.max_prompt_length:
            raise ValueError(f"row {row.index}: prompt of {length} tokens > max_prompt_length")
        prompt_ids = encoded["input_ids"][0].tolist()
        for sample in result.samples:
            response = truncate_at(sample.token_ids, forbidden)
            queries.append(encoder.decode(prompt_ids + response))
            prompts.append(encoder.prompt_text(row.messages))
            labels.append(row.label)
            samples.append(ScoredSample(encoded, response, 0.0, 0.0))
    scoring_started = time.monotonic()
    scores = verifier.score(queries, prompts, labels)
    reward_seconds = time.monotonic() - scoring_started
    rewards = torch.tensor(scores["rewards"], dtype=torch.float32)
    shaped = group_baseline(rewards, algo.samples_per_prompt, algo.advantage_estimator)
    for i, scored in enumerate(samples):
        scored.reward = float(rewards[i])
        scored.accuracy = float(scores["acc_rewards"][i])
        scored.shaped_reward = float(shaped[i])
    generated = sum(len(s.response) for s in samples)
    stats = RolloutStats(
        reward=float(rewards.mean()),
        accuracy=(
            sum(scores["acc_rewards"]) / len(samples) / reward.accuracy_weight
            if reward.accuracy_weight > 0
            else None
        ),
        format_reward=sum(scores["format_rewards"]) / len(samples),
        response_length=generated / len(samples),
        generated_tokens=generated,
        seconds=time.monotonic() - started,
        weight_version=version,
        generate_seconds=generate_seconds,
        reward_seconds=reward_seconds,
    )
    return samples, stats


@dataclass
class MicroBatch:
    batch: SequenceBatch
    old_log_probs: Tensor | None  # None: the update's own log-probs, detached (see above)
    ref_log_probs: Tensor | None
    advantages: Tensor
    kl: Tensor
    kl_estimator: KLEstimator = "k3"  # how `kl` is estimated from the old and reference log-probs
    extra: dict[str, Any] = field(default_factory=dict)
    values: Tensor | None = None  # gae: the critic's values at experience time (B, T)
    returns: Tensor | None = None  # gae: the critic's targets, advantages + values (B, T)

    def old_or(self, current: Tensor) -> Tensor:
        """The old policy's log-probs; `current` (detached) when they were not precomputed,
        recording the KL to the reference from them for the step's metrics."""
        if self.old_log_probs is not None:
            return self.old_log_probs.to(current.device)
        old = current.detach()
        if self.ref_log_probs is not None:
            kl = approx_kl(old.cpu(), self.ref_log_probs, self.kl_estimator)
            self.kl = kl * self.batch.response_mask
        return old


def old_log_probs_from_update(algo: AlgorithmConfig, updates_per_rollout: int) -> bool:
    """Whether the old-log-prob pass can be skipped: one update per rollout, and no KL in
    the reward (whose returns need the old log-probs before any loss)."""
    return updates_per_rollout == 1 and not algo.kl_in_reward


def prepare_micro_batches(
    samples: list[ScoredSample],
    policy: Any,
    reference: Any | None,
    encoder: ChatEncoder,
    algo: AlgorithmConfig,
    skip_old_log_probs: bool = False,
    critic: Any | None = None,
    critic_config: CriticConfig | None = None,
) -> list[MicroBatch]:
    """Old/ref log-probs, KL and returns (not yet whitened) per micro-batch of this rank.

    `skip_old_log_probs` (only where `old_log_probs_from_update`): no old-log-prob pass;
    the update supplies them through `MicroBatch.old_or`. `critic` (gae, with
    `critic_config`): the critic's values, and GAE advantages instead of the returns."""
    if (critic is None) != (algo.advantage_estimator != "gae") or (
        critic is not None and critic_config is None
    ):
        raise ValueError("advantage_estimator gae needs the critic and its config, and only gae")
    if skip_old_log_probs and algo.kl_in_reward:
        raise ValueError("the KL in the reward needs the old log-probs before the update")
    size = algo.micro_train_batch_size
    prepared: list[MicroBatch] = []
    with torch.no_grad():
        for start in range(0, len(samples), size):
            chunk = samples[start : start + size]
            batch = build_sequence_batch(
                [s.prompt for s in chunk],
                [s.response for s in chunk],
                encoder.pad_token_id,
                encoder.image_token_id,
            )
            mask = batch.response_mask
            old = None
            if not skip_old_log_probs:
                old = response_log_probs(policy, batch, algo.temperature)
            ref = None
            kl = torch.zeros(mask.shape)
            estimator = "k1" if algo.kl_in_reward else algo.kl_estimator
            if reference is not None:
                ref = response_log_probs(reference, batch, algo.temperature).cpu()
                if old is not None:
                    kl = approx_kl(old.cpu(), ref, estimator) * mask
            in_reward_kl = kl if algo.kl_in_reward else torch.zeros_like(kl)
            shaped = torch.tensor([s.shaped_reward for s in chunk])
            rewards = token_rewards(shaped, in_reward_kl, mask, algo.kl_coef)
            old_cpu = None if old is None else old.cpu()
            if critic is None or critic_config is None:
                returns = cumulative_returns(rewards, mask)
                prepared.append(MicroBatch(batch, old_cpu, ref, returns, kl, estimator))
                continue
            values = response_values(critic, batch).cpu() * mask
            advantages, targets = gae_advantages(
                rewards, values, mask, critic_config.gamma, critic_config.gae_lambda
            )
            prepared.append(
                MicroBatch(
                    batch, old_cpu, ref, advantages, kl, estimator, values=values, returns=targets
                )
            )
    return prepared


def whiten_across_ranks(
    micro_batches: list[MicroBatch], device: torch.device | str = "cpu", eps: float = 1e-8
) -> None:
    """Mean 0, variance 1 over every real response token of the rollout batch (all ranks).
    `device`: where the sums are reduced across ranks, the engine's (NCCL reduces CUDA
    tensors only); the advantages stay where they are."""
    totals = torch.zeros(2, dtype=torch.float64)
    for mb in micro_batches:
        mask = mb.batch.response_mask.double()
        totals[0] += (mb.advantages.double() * mask).sum()
        totals[1] += mask.sum()
    totals = all_reduce_sum(totals, device)
    mean = totals[0] / totals[1].clamp(min=1)
    variance = torch.zeros(1, dtype=torch.float64)
    for mb in micro_batches:
        mask = mb.batch.response_mask.double()
        variance += (((mb.advantages.double() - mean) ** 2) * mask).sum()
    variance = all_reduce_sum(variance, device)
    rstd = (variance / totals[1].clamp(min=1)).clamp(min=eps).rsqrt()
    for mb in micro_batches:
        mask = mb.batch.response_mask.float()
        mb.advantages = ((mb.advantages.double() - mean) * rstd).float() * mask


def mean_kl(micro_batches: list[MicroBatch]) -> float:
    values = [masked_mean(mb.kl, mb.batch.response_mask).item() for mb in micro_batches]
    return sum(values) / max(1, len(values))
