"""Advantages, KL and losses on small hand-computed tensors (LMM-R1 / OpenRLHF semantics)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lmmr1_trainer.algorithms import (
    approx_kl,
    compute_advantages,
    cosine_lr_multiplier,
    cumulative_returns,
    gae_advantages,
    group_baseline,
    kl_loss,
    last_token_index,
    masked_mean,
    policy_loss,
    token_log_probs,
    token_rewards,
    value_loss,
    whiten,
)


def close(a: torch.Tensor, b: list[float] | list[list[float]], tol: float = 1e-5) -> bool:
    return torch.allclose(a.float(), torch.tensor(b), atol=tol)


def test_reinforce_baseline_subtracts_the_group_mean() -> None:
    rewards = torch.tensor([1.5, 0.5, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    # groups of 4: means 0.5 and 0.75
    assert close(group_baseline(rewards, 4, "reinforce_baseline"),
                 [1.0, 0.0, -0.5, -0.5, 0.25, 0.25, 0.25, -0.75])  # fmt: skip


def test_rloo_uses_the_mean_of_the_other_samples() -> None:
    rewards = torch.tensor([0.0, 1.0, 0.0, 1.0])
    # sample 0: 0 - (1+0+1)/3 = -2/3; sample 1: 1 - (0+0+1)/3 = 2/3
    assert close(group_baseline(rewards, 4, "rloo"), [-2 / 3, 2 / 3, -2 / 3, 2 / 3])


def test_grpo_normalises_within_the_group_with_the_sample_std() -> None:
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0])
    std = math.sqrt(5 / 3)  # unbiased std of 0..3
    expected = [(r - 1.5) / (std + 1e-9) for r in (0.0, 1.0, 2.0, 3.0)]
    assert close(group_baseline(rewards, 4, "grpo"), expected)
    assert close(group_baseline(torch.ones(4), 4, "grpo"), [0.0] * 4)


def test_group_baseline_rejects_bad_groups_and_keeps_gae_rewards() -> None:
    with pytest.raises(ValueError, match="groups of 3"):
        group_baseline(torch.zeros(4), 3, "reinforce_baseline")
    # gae: the critic is the baseline, the raw reward goes on the last token.
    assert close(group_baseline(torch.tensor([1.0, 0.0, 0.5]), 1, "gae"), [1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="critic"):
        compute_advantages(torch.zeros(4), torch.ones(4, 2), 2, "gae")


def test_kl_estimators() -> None:
    log_p = torch.tensor([math.log(0.5), math.log(0.2)])
    log_ref = torch.tensor([math.log(0.25), math.log(0.4)])
    ratio = log_p - log_ref  # [log 2, log 0.5]
    assert close(approx_kl(log_p, log_ref, "k1"), ratio.tolist())
    assert close(approx_kl(log_p, log_ref, "k2"), (ratio**2 / 2).tolist())
    # k3 = ref/p - 1 - log(ref/p): [0.5 - 1 + log 2, 2 - 1 - log 2]
    assert close(approx_kl(log_p, log_ref, "k3"), [-0.5 + math.log(2), 1 - math.log(2)])


def test_reward_goes_on_the_last_real_token_with_a_per_token_kl_penalty() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert last_token_index(mask).flatten().tolist() == [2, 1]
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 0.5, 9.0, 9.0]])
    shaped = token_rewards(torch.tensor([1.0, -1.0]), kl, mask, kl_coef=0.1)
    assert close(shaped, [[-0.01, -0.02, 0.97, 0.0], [-0.05, -1.05, 0.0, 0.0]])


def test_cumulative_returns_sum_the_future() -> None:
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    assert close(cumulative_returns(rewards, mask), [[6.0, 5.0, 3.0, 0.0]])
    assert close(cumulative_returns(rewards, mask, gamma=0.5), [[2.75, 3.5, 3.0, 0.0]])


def test_whiten_uses_only_real_tokens() -> None:
    values = torch.tensor([[1.0, 3.0, 50.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert close(whiten(values, mask), [[-1.0, 1.0, 0.0]], tol=1e-4)


def test_compute_advantages_reinforce_baseline_end_to_end() -> None:
    # Two prompts x 2 samples, responses of 2 and 1 tokens, no KL.
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]])
    # baselined: [0.5, -0.5, 0, 0]; returns per token: [[.5,.5],[-.5,0],[0,0],[0,0]]
    # real tokens: .5 .5 -.5 0 0 0 -> mean 1/12, var = mean(x^2) - mean^2
    tokens = torch.tensor([0.5, 0.5, -0.5, 0.0, 0.0, 0.0])
    mean = tokens.mean()
    rstd = 1 / torch.sqrt(((tokens - mean) ** 2).mean())
    expected = [
        [(0.5 - mean) * rstd, (0.5 - mean) * rstd],
        [(-0.5 - mean) * rstd, 0.0],
        [(0 - mean) * rstd, (0 - mean) * rstd],
        [(0 - mean) * rstd, 0.0],
    ]
    got = compute_advantages(rewards, mask, 2, "reinforce_baseline")
    assert close(got, [[float(x) for x in row] for row in expected], tol=1e-4)
    grpo = compute_advantages(rewards, mask, 2, "grpo")  # group-normalised, not whitened
    assert grpo[0, 0] > 0 and grpo[1, 0] < 0 and close(grpo[2:], [[0.0, 0.0], [0.0, 0.0]])


def test_kl_penalty_lowers_advantages_of_tokens_that_drift() -> None:
    rewards = torch.tensor([1.0, 1.0])
    mask = torch.ones(2, 2, dtype=torch.long)
    kl = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    adv = compute_advantages(rewards, mask, 2, "reinforce_baseline", kl=kl, kl_coef=0.1)
    assert (adv[0] > adv[1]).all()


def test_policy_loss_clips_the_ratio_and_averages_tokens() -> None:
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.tensor([[1, 1, 1]])
    loss, clip_fraction = policy_loss(new, old, adv, mask, clip_range=0.2)
    # token 0: min(1.5, 1.2) = 1.2; token 1: min(0.5, 0.8) = 0.5; token 2: -2
    assert math.isclose(float(loss), -(1.2 + 0.5 - 2.0) / 3, rel_tol=1e-5)
    assert math.isclose(float(clip_fraction), 1 / 3, rel_tol=1e-5)
    masked, _ = policy_loss(new, old, adv, torch.tensor([[1, 0, 0]]), clip_range=0.2)
    assert math.isclose(float(masked), -1.2, rel_tol=1e-5)


def test_policy_loss_gradient_is_zero_outside_the_trust_region() -> None:
    new = torch.log(torch.tensor([[1.5]])).requires_grad_()
    loss, _ = policy_loss(new, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss.backward()
    assert new.grad is not None and float(new.grad.abs().sum()) == 0.0


def test_kl_loss_is_a_token_mean() -> None:
    log_p = torch.tensor([[0.0, math.log(0.5)]])
    log_ref = torch.tensor([[0.0, math.log(0.25)]])
    got = float(kl_loss(log_p, log_ref, torch.ones(1, 2), "k1"))
    assert math.isclose(got, math.log(2) / 2, rel_tol=1e-6)


def test_cosine_schedule_warms_up_then_decays_to_the_floor() -> None:
    total, warm, floor = 100, 0.03, 0.1
    values = [cosine_lr_multiplier(s, total, warm, floor) for s in range(total)]
    assert values[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert values[3] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(floor, abs=1e-3)
    assert all(a >= b for a, b in itertools.pairwise(values[3:]))
    assert cosine_lr_multiplier(500, total, warm, floor) == pytest.approx(floor)


def test_token_log_probs_and_masked_mean() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert close(token_log_probs(logits, torch.tensor([[1]])), [[math.log(0.75)]])
    assert close(token_log_probs(logits, torch.tensor([[1]]), temperature=1e9), [[math.log(0.5)]])
    assert float(masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1, 1, 0]))) == 2.0


# -- gae: the critic's advantages and value loss -----------------------------------------


def _gae_reference(
    rewards: list[float], values: list[float], length: int, gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """GAE for one response of `length` real tokens, straight from the definition:
    A_t = sum_k (gamma lam)^k delta_{t+k}, delta_t = r_t + gamma V_{t+1} - V_t, V_length = 0."""
    v = [*values[:length], 0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(length)]
    advantages = [
        sum((gamma * lam) ** k * deltas[t + k] for k in range(length - t)) for t in range(length)
    ]
    returns = [a + v[t] for t, a in enumerate(advantages)]
    pad = [0.0] * (len(rewards) - length)
    return advantages + pad, returns + pad


@pytest.mark.parametrize(("gamma", "lam"), list(itertools.product([1.0, 0.95], [1.0, 0.95])))
def test_gae_matches_the_definition_on_random_rollouts(gamma: float, lam: float) -> None:
    generator = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    rewards = torch.randn(6, 7, generator=generator)
    values = torch.randn(6, 7, generator=generator)
    lengths = [7, 1, 4, 0, 3, 6]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    for row, n in enumerate(lengths):
        # Padding holds garbage on purpose: it must not leak into real tokens.
        want_adv, want_ret = _gae_reference(
            rewards[row].tolist(), values[row].tolist(), n, gamma, lam
        )
        assert close(advantages[row], want_adv, tol=1e-4), (row, advantages[row], want_adv)
        assert close(returns[row], want_ret, tol=1e-4), (row, returns[row], want_ret)


def test_gae_with_gamma_and_lambda_one_is_return_minus_value() -> None:
    # The scripts' setting: the reward on the last token, no KL: A_t = R - V_t.
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards = token_rewards(torch.tensor([1.0]), torch.zeros(1, 4), mask, kl_coef=0.0)
    values = torch.tensor([[0.2, 0.5, 0.9, 7.0]])
    advantages, returns = gae_advantages(rewards, values, mask, 1.0, 1.0)
    assert close(advantages, [[0.8, 0.5, 0.1, 0.0]])
    assert close(returns, [[1.0, 1.0, 1.0, 0.0]])


def test_gae_advantages_are_whitened_over_real_tokens_only() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rewards = torch.tensor([[0.0, 1.0, 5.0], [0.0, 5.0, 5.0]])
    advantages, _ = gae_advantages(rewards, torch.zeros(2, 3), mask, 1.0, 1.0)
    # real tokens: 1, 1, 0 -> mean 2/3, std sqrt(2)/3
    white = whiten(advantages, mask)
    assert close(white, [[0.7071, 0.7071, 0.0], [-1.4142, 0.0, 0.0]], tol=1e-3)


def test_value_loss_clips_how_far_the_value_moves() -> None:
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0, -1.0, 0.0]])
    new = torch.tensor([[0.5, 0.1, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # token 0: moved 0.5 towards the return, clipped to 0.2: max(0.25, 0.64) = 0.64
    # token 1: inside the clip: 0.81 both ways; token 2: moved away: max(2.25, 1.44) = 2.25
    loss = value_loss(new, old, returns, mask, value_clip=0.2)
    assert math.isclose(float(loss), 0.5 * (0.64 + 0.81 + 2.25) / 3, rel_tol=1e-5)
    unclipped = value_loss(new, old, returns, mask, value_clip=None)
    assert math.isclose(float(unclipped), 0.5 * (0.25 + 0.81 + 2.25) / 3, rel_tol=1e-5)
    # The clipped loss still has a gradient towards the return where the value stays within
    # the clip, and none where the clipped error is the larger one (token 0).
    values = new.clone().requires_grad_(True)
    value_loss(values, old, returns, mask, value_clip=0.2).backward()
    assert values.grad is not None
    assert close(values.grad, [[0.0, -0.9 / 3, 1.5 / 3, 0.0]])
