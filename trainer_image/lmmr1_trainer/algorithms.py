"""The RL maths of LMM-R1, as pure functions of tensors (no model, no I/O).

Shapes: `B` samples (prompts x samples_per_prompt, grouped: the `n` samples of a prompt are
consecutive), `T` response tokens (right-padded; `mask` is 1 on real response tokens).

The pipeline follows OpenRLHF as used by LMM-R1 (`experience_maker.py`):
1. group baseline on the scalar rewards — `reinforce_baseline`: r - mean(group);
   `rloo`: r - mean(others in the group); `grpo`: (r - mean) / (std + 1e-9);
2. reward shaping: the scalar goes on the last response token and every token gets
   -kl_coef * KL(policy_old || reference) (k1 by default: the paper's per-token penalty);
3. returns: the reverse cumulative sum over tokens (gamma = 1);
4. batch whitening of the token advantages (mean 0, std 1 over every real token of the
   rollout batch), except for `grpo` whose advantages are already normalised per group.
The update uses the PPO-clip surrogate averaged over every real token of a micro-batch
(token-level mean); optionally the KL is a loss term instead of a reward penalty.

`gae` (PPO with a critic, LMM-R1's MGT-Geo, Direct-RL and Sokoban scripts) skips step 1 (the
raw reward goes on the last token), replaces step 3 by generalised advantage estimation
against the critic's per-token values (`gae_advantages`: returns = advantages + values),
and whitens as in step 4; the critic learns the returns with a clipped value loss
(`value_loss`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Estimator = Literal["reinforce_baseline", "grpo", "rloo", "gae"]
KLEstimator = Literal["k1", "k2", "k3"]


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def group_baseline(rewards: Tensor, samples_per_prompt: int, estimator: Estimator) -> Tensor:
    """Step 1: rewards (B,) minus the group baseline, (B,); `gae` has no group baseline (the
    critic's values are its baseline), so its rewards are returned as they are."""
    if estimator == "gae":
        return rewards.float().reshape(-1)
    n = samples_per_prompt
    if rewards.numel() % n:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {n}")
    grouped = rewards.float().view(-1, n)
    if estimator == "reinforce_baseline":
        shaped = grouped - grouped.mean(-1, keepdim=True)
    elif estimator == "rloo":
        if n < 2:
            raise ValueError("rloo needs samples_per_prompt >= 2")
        shaped = grouped - (grouped.sum(-1, keepdim=True) - grouped) / (n - 1)
    elif estimator == "grpo":
        std = grouped.std(-1, keepdim=True) if n > 1 else torch.zeros_like(grouped)
        shaped = (grouped - grouped.mean(-1, keepdim=True)) / (std + 1e-9)
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}")
    return shaped.reshape(-1)


def approx_kl(log_probs: Tensor, ref_log_probs: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token KL(policy || reference) estimates from the sampled tokens' log-probs."""
    log_ratio = log_probs.float() - ref_log_probs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return log_ratio.pow(2) / 2
    if estimator == "k3":  # unbiased, always >= 0 (Schulman)
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last real token of each row of a (B, T) mask, (B, 1)."""
    flipped = mask.long().fliplr().argmax(dim=1, keepdim=True)
    return mask.size(1) - 1 - flipped


def token_rewards(rewards: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Step 2: (B, T) rewards: -kl_coef * kl on every token, plus the scalar on the last one."""
    shaped = -max(kl_coef, 0.0) * kl.float()
    shaped = shaped.scatter_add(1, last_token_index(mask), rewards.float().unsqueeze(1))
    return shaped * mask.float()


def cumulative_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Step 3: return_t = sum_{s >= t} gamma^(s-t) r_s over the response, (B, T)."""
    rewards = rewards * mask.float()
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.size(0), dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.size(1))):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, gae_lambda: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens, (advantages, returns).

    rewards, values (B, T) per token (the value of the state each response token is sampled
    from); the value after the last real token is 0 (the episode ends there). With
    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lambda * A_{t+1};
    returns = A + V, the critic's targets. Padding contributes nothing (0 rewards and values
    past the end: right padding keeps every real token before it)."""
    mask = mask.float()
    rewards, values = rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.size(0), dtype=rewards.dtype, device=rewards.device)
    next_values = torch.zeros_like(running)
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = delta + gamma * gae_lambda * running
        advantages[:, t] = running
        next_values = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, value_clip: float | None
) -> Tensor:
    """The critic's clipped squared error (OpenRLHF's `ValueLoss`), token-level mean.

    The new value may move at most `value_clip` from the value the rollout was scored with
    before the larger of the clipped and unclipped errors counts (PPO's value clipping);
    `None`: plain 0.5 * (V - returns)^2."""
    values, returns = values.float(), returns.float()
    error = (values - returns).pow(2)
    if value_clip is not None:
        old_values = old_values.float()
        clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        error = torch.max(error, (clipped - returns).pow(2))
    return 0.5 * masked_mean(error, mask)


def whiten(advantages: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Step 4: mean 0 and variance 1 over the real tokens of the whole batch."""
    mean = masked_mean(advantages, mask)
    var = masked_mean((advantages - mean).pow(2), mask)
    return (advantages - mean) * var.clamp(min=eps).rsqrt() * mask.float()


def compute_advantages(
    rewards: Tensor,
    mask: Tensor,
    samples_per_prompt: int,
    estimator: Estimator,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """Steps 1-4: token advantages (B, T) from scalar rewards (B,) and per-token KL (B, T)."""
    if estimator == "gae":
        raise ValueError("gae needs the critic's values: use gae_advantages")
    baselined = group_baseline(rewards, samples_per_prompt, estimator)
    per_token_kl = kl if kl is not None else torch.zeros_like(mask, dtype=torch.float32)
    returns = cumulative_returns(token_rewards(baselined, per_token_kl, mask, kl_coef), mask)
    if estimator == "grpo":
        return returns
    return whiten(returns, mask)


def policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
) -> tuple[Tensor, Tensor]:
    """PPO-clip surrogate, token-level mean over the micro-batch. Returns (loss, clip fraction)."""
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * advantages
    loss = masked_mean(-torch.min(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped < unclipped).float(), mask)
    return loss, clip_fraction.detach()


def kl_loss(
    log_probs: Tensor, ref_log_probs: Tensor, mask: Tensor, estimator: KLEstimator
) -> Tensor:
    """KL to the reference as a loss term (when `kl_in_reward` is off), token-level mean."""
    return masked_mean(approx_kl(log_probs, ref_log_probs, estimator), mask)


def cosine_lr_multiplier(
    step: int, total_steps: int, warmup_ratio: float, min_ratio: float
) -> float:
    """Linear warmup over ceil(warmup_ratio * total) steps, then cosine from 1 to min_ratio."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def token_log_probs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(token) under softmax(logits / temperature); logits (..., V), tokens (...)."""
    scaled = logits.float() / temperature
    picked = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)
