"""From prompts to scored samples and token advantages (`collect_rollout`,
`prepare_micro_batches`, `whiten_across_ranks`), with two in-process rollout servers that
answer from a script and the real verifier in process.

Each prompt's scripted samples are right, wrong or ill-formed in a pattern of its own, so a
label paired with the wrong prompt, a group baseline over the wrong samples or a statistic
over the wrong values changes a number checked here. The log-probs, the KL term and the
returns are checked against an independent computation: one unpadded forward pass per
sample and plain Python sums.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from tests.scripted_rollout import TOKEN, Chat, ScriptedBackend, serving, user_text

from lmmr1_trainer.config import AlgorithmConfig, CriticConfig, DatasetConfig, RewardConfig
from lmmr1_trainer.critic import CriticModel
from lmmr1_trainer.data import ImageLoader, PromptRow, decode_images, load_dataset
from lmmr1_trainer.experience import (
    MicroBatch,
    ScoredSample,
    collect_rollout,
    mean_kl,
    old_log_probs_from_update,
    prepare_micro_batches,
    whiten_across_ranks,
)
from lmmr1_trainer.models import ChatEncoder, load_model, response_log_probs
from lmmr1_trainer.rollout.client import RewardClient, RolloutClient
from lmmr1_trainer.rollout.protocol import Sample
from lmmr1_trainer.synthetic import chat_message, write_dataset
from lmmr1_trainer.tiny_model import build_tiny_model
from lmmr1_trainer.verifier.config import PoolSettings, RewardWeights, VerifierConfig
from lmmr1_trainer.verifier.engine import Verifier
from lmmr1_trainer.verifier.protocol import GetRewardResponse

N = 4  # samples per prompt
FORMAT, ACCURACY = 0.5, 2.0  # weights; accuracy 2.0 so that a missing division shows
# Per prompt, what each of its N samples does: C right answer, W wrong answer (well formed),
# X no format and no answer, V a right answer cut at a vision token the server let through.
PLAN = {0: "CCWX", 1: "CWWW", 2: "XXXX", 3: "VXCW", 4: "WCCC"}
REWARD = {"C": FORMAT + ACCURACY, "V": FORMAT + ACCURACY, "W": FORMAT, "X": 0.0}
WEIGHT_VERSION = 7


@dataclass
class Setup:
    encoder: ChatEncoder
    rows: list[PromptRow]
    policy: Any
    reference: Any


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    torch.set_num_threads(2)
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny-vl"))
    data = tmp_path_factory.mktemp("data")
    write_dataset("counting", 1, 0, str(data))
    image_row = load_dataset(DatasetConfig(uri=str(data / "train.jsonl"), type="multimodal"))[0]
    questions = ["What is 3 + 4?", "What is 10 * 2?", "What is 8 - 5?", "", "What is 6 * 6?"]
    rows = [PromptRow(i, chat_message(q, None), str(11 * (i + 1))) for i, q in enumerate(questions)]
    rows[3] = PromptRow(3, image_row.messages, "4")  # five prompts: not a multiple of N
    policy = load_model(model_dir).eval()
    reference = load_model(model_dir).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a reference that differs from the policy: the KL is not zero
        for parameter in reference.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return Setup(ChatEncoder.load(model_dir), rows, policy, reference)


def response_text(kind: str, label: str) -> str:
    # Boxed: the default reward (the LMM-R1 reference's) reads only boxed or $-delimited answers.
    boxed = "\\boxed{" + label + "}"
    return {
        "C": f"<think>so</think><answer>{boxed}</answer><|im_end|>",
        "V": f"<think>so</think><answer>{boxed}</answer><|vision_start|>12<|im_end|>",
        "W": f"<think>so</think><answer>\\boxed{{{label}9}}</answer><|im_end|>",
        "X": "no idea<|im_end|>",
    }[kind]


def scripted_ids(encoder: ChatEncoder, kind: str, label: str) -> list[int]:
    ids: list[int] = encoder.tokenizer(response_text(kind, label), add_special_tokens=False)[
        "input_ids"
    ]
    return ids


def expected_response(encoder: ChatEncoder, kind: str, label: str) -> list[int]:
    """What the trainer keeps: everything before the first vision token."""
    ids = scripted_ids(encoder, kind, label)
    vision = set(encoder.vision_token_ids)
    return ids[: next((i for i, t in enumerate(ids) if t in vision), len(ids))]


class RecordingVerifier(RewardClient):
    """The real verifier, in this process (no worker pool), recording what it was sent."""

    def __init__(self) -> None:
        super().__init__("http://unused")
        config = VerifierConfig(
            pool=PoolSettings(workers=0), weights=RewardWeights(format=FORMAT, accuracy=ACCURACY)
        )
        self.verifier = Verifier(config)
        self.calls: list[tuple[list[str], list[str], list[str]]] = []

    def score(
        self, queries: list[str], prompts: list[str], labels: list[str]
    ) -> dict[str, list[float]]:
        self.calls.append((list(queries), list(prompts), list(labels)))
        results = self.verifier.score(self.verifier.samples_from_queries(queries, labels))
        scores: dict[str, list[float]] = GetRewardResponse.from_results(results).model_dump()
        return scores


def algorithm(**overrides: Any) -> AlgorithmConfig:
    settings: dict[str, Any] = {
        "samples_per_prompt": N,
        "rollout_batch_size": len(PLAN),
        "train_batch_size": N * len(PLAN),
        "micro_train_batch_size": 3,  # 20 samples: micro-batches of 3 (six) and 2
        "temperature": 0.7,
        "kl_coef": 0.1,
        "max_generation_length": 64,
        "seed": 5,
    }
    return AlgorithmConfig(**(settings | overrides))


@dataclass
class Rollout:
    samples: list[ScoredSample]
    stats: Any
    verifier: RecordingVerifier
    backends: list[ScriptedBackend]


def rollout(setup: Setup, algo: AlgorithmConfig) -> Rollout:
    by_question = {user_text(row.messages): row for row in setup.rows}

    def answer(chat: Chat, k: int, seed: int | None) -> Sample:
        row = by_question[user_text(chat)]
        ids = scripted_ids(setup.encoder, PLAN[row.index][k], row.label)
        return Sample(token_ids=ids, logprobs=[-1.0] * len(ids), text="", finish_reason="stop")

    backends = [ScriptedBackend(answer), ScriptedBackend(answer)]
    verifier = RecordingVerifier()
    with serving(*backends) as servers:
        for server in servers:
            server.weight_version = WEIGHT_VERSION
        client = RolloutClient([s.url for s in servers], TOKEN, backoff_s=0)
        reward = RewardConfig(url="http://unused", accuracy_weight=ACCURACY)
        samples, stats = collect_rollout(
            setup.rows, client, verifier, setup.encoder, ImageLoader(), algo, reward, seed=9
        )
    return Rollout(samples, stats, verifier, backends)


def kinds() -> list[str]:
    return [kind for index in sorted(PLAN) for kind in PLAN[index]]


def test_each_sample_is_scored_against_its_own_prompt_and_label(setup: Setup) -> None:
    algo = algorithm()
    result = rollout(setup, algo)
    encoder, rows = setup.encoder, setup.rows
    # Both servers were used, each for its contiguous share, with the prompts' images inline.
    served = [[user_text(c) for c in b.requests[0].prompts] for b in result.backends]
    assert served == [[user_text(r.messages) for r in part] for part in (rows[:3], rows[3:])]
    assert result.backends[0].requests[0].sampling.seed == 9
    image_ref = result.backends[1].requests[0].prompts[0][1]["content"][0]["image"]
    assert image_ref.startswith("data:image/png;base64,")

    # What the verifier got: sample i belongs to prompt i // N.
    assert len(result.verifier.calls) == 1
    queries, prompts, labels = result.verifier.calls[0]
    assert len(queries) == len(prompts) == len(labels) == N * len(rows)
    for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels, strict=True)):
        row, kind = rows[i // N], kinds()[i]
        assert label == row.label, f"sample {i} is labelled with another prompt's answer"
        assert prompt == encoder.prompt_text(row.messages)
        encoded = encoder.encode(row.messages, decode_images(row.messages))
        response = expected_response(encoder, kind, row.label)
        assert query == encoder.decode(encoded["input_ids"][0].tolist() + response)
        assert user_text(row.messages) in query

    # The scored samples: the prompt's encoding, its own response, the rewards it earned.
    assert len(result.samples) == N * len(rows)
    for i, sample in enumerate(result.samples):
        row, kind = rows[i // N], kinds()[i]
        encoded = encoder.encode(row.messages, decode_images(row.messages))
        assert torch.equal(sample.prompt["input_ids"], encoded["input_ids"])
        assert ("pixel_values" in sample.prompt) == (row.index == 3)
        assert sample.response == expected_response(encoder, kind, row.label)
        assert sample.reward == pytest.approx(REWARD[kind]), (i, kind)
        assert sample.accuracy == (ACCURACY if kind in "CV" else 0.0), (i, kind)


@pytest.mark.parametrize("estimator", ["reinforce_baseline", "rloo", "grpo"])
def test_the_baseline_groups_each_prompts_own_samples_and_the_statistics_add_up(
    setup: Setup, estimator: str
) -> None:
    result = rollout(setup, algorithm(advantage_estimator=estimator))
    rewards = [REWARD[k] for k in kinds()]
    for group in range(len(PLAN)):
        mine = rewards[group * N : (group + 1) * N]
        mean = sum(mine) / N
        std = (sum((r - mean) ** 2 for r in mine) / (N - 1)) ** 0.5
        for j, r in enumerate(mine):
            if estimator == "reinforce_baseline":
                expected = r - mean
            elif estimator == "rloo":
                expected = r - (sum(mine) - r) / (N - 1)
            else:
                expected = (r - mean) / (std + 1e-9)
            got = result.samples[group * N + j].shaped_reward
            assert got == pytest.approx(expected, abs=1e-5), (group, j)
    lengths = [len(s.response) for s in result.samples]
    stats = result.stats
    assert stats.reward == pytest.approx(sum(rewards) / len(rewards))
    correct = sum(k in "CV" for k in kinds())
    assert stats.accuracy == pytest.approx(correct / len(rewards))  # a fraction, not weighted
    well_formed = sum(k in "CVW" for k in kinds())
    assert stats.format_reward == pytest.approx(FORMAT * well_formed / len(rewards))
    assert stats.generated_tokens == sum(lengths)
    assert stats.response_length == pytest.approx(sum(lengths) / len(lengths))
    assert stats.weight_version == WEIGHT_VERSION


def independent_log_probs(
    model: Any, encoder: ChatEncoder, sample: ScoredSample, temperature: float
) -> torch.Tensor:
    """log p(response token | prefix) from one unpadded forward pass of this sample alone."""
    ids = torch.cat([sample.prompt["input_ids"][0], torch.tensor(sample.response)]).unsqueeze(0)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    if "pixel_values" in sample.prompt:
        assert encoder.image_token_id is not None
        inputs["pixel_values"] = sample.prompt["pixel_values"]
        inputs["image_grid_thw"] = sample.prompt["image_grid_thw"]
        inputs["mm_token_type_ids"] = ids.eq(encoder.image_token_id).int()
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0].double()
    start = sample.prompt["input_ids"].shape[-1] - 1
    rows = torch.log_softmax(logits[start : start + len(sample.response)] / temperature, dim=-1)
    return rows.gather(1, torch.tensor(sample.response).unsqueeze(1)).squeeze(1)


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        got.double(), expected.double(), atol=1e-4, rtol=0, msg=lambda m: f"{what}: {m}"
    )


def per_sample(micro_batches: list[MicroBatch], name: str) -> Iterator[torch.Tensor]:
    """Each sample's real response tokens of a micro-batch tensor, in sample order."""
    for mb in micro_batches:
        values = getattr(mb, name)
        for row, mask in zip(values, mb.batch.response_mask, strict=True):
            yield row[mask.bool()]


@pytest.mark.parametrize(
    ("kl_in_reward", "estimator"), [(True, "k1"), (False, "k3")], ids=["kl-in-reward", "kl-loss"]
)
def test_log_probs_kl_and_returns_match_an_independent_computation(
    setup: Setup, kl_in_reward: bool, estimator: str
) -> None:
    algo = algorithm(kl_in_reward=kl_in_reward, kl_estimator=estimator)
    samples = rollout(setup, algo).samples
    mbs = prepare_micro_batches(samples, setup.policy, setup.reference, setup.encoder, algo)
    assert [len(mb.batch.prompt_lengths) for mb in mbs] == [3, 3, 3, 3, 3, 3, 2]
    olds = list(per_sample(mbs, "old_log_probs"))
    refs = list(per_sample(mbs, "ref_log_probs"))
    kls = list(per_sample(mbs, "kl"))
    returns = list(per_sample(mbs, "advantages"))
    all_returns: list[float] = []
    for i, sample in enumerate(samples):
        old = independent_log_probs(setup.policy, setup.encoder, sample, algo.temperature)
        ref = independent_log_probs(setup.reference, setup.encoder, sample, algo.temperature)
        assert_close(olds[i], old, f"old log-probs of sample {i}")
        assert_close(refs[i], ref, f"reference log-probs of sample {i}")
        log_ratio = old - ref
        # k1 is the log-ratio; Schulman's k3 is r - 1 - log r with r = p_ref / p_old.
        kl = log_ratio if estimator == "k1" else torch.exp(-log_ratio) - 1 + log_ratio
        assert_close(kls[i], kl, f"KL of sample {i}")
        # Returns: the shaped reward on the last token, -kl_coef * KL on every token when
        # the KL is in the reward, summed from each token to the end.
        token_rewards = [(-algo.kl_coef * float(k) if kl_in_reward else 0.0) for k in kl]
        token_rewards[-1] += sample.shaped_reward
        expected = [sum(token_rewards[t:]) for t in range(len(token_rewards))]
        assert_close(returns[i], torch.tensor(expected), f"returns of sample {i}")
        all_returns += expected
    assert any(abs(float(k)) > 1e-3 for kl in kls for k in kl)  # the KL term is not zero
    per_batch = [float((mb.kl * mb.batch.response_mask).sum() / mb.batch.response_mask.sum())
                 for mb in mbs]  # fmt: skip
    assert mean_kl(mbs) == pytest.approx(sum(per_batch) / len(per_batch), abs=1e-6)

    # Whitening over every real token of the batch (one rank here).
    whiten_across_ranks(mbs)
    mean = sum(all_returns) / len(all_returns)
    std = (sum((r - mean) ** 2 for r in all_returns) / len(all_returns)) ** 0.5
    whitened = torch.cat(list(per_sample(mbs, "advantages"))).double()
    expected_whitened = (torch.tensor(all_returns, dtype=torch.float64) - mean) / std
    assert_close(whitened, expected_whitened, "whitened advantages")
    for mb in mbs:  # padding stays zero
        assert float((mb.advantages * (1 - mb.batch.response_mask)).abs().sum()) == 0.0


def test_one_update_per_rollout_takes_its_old_log_probs_from_the_update_itself(
    setup: Setup,
) -> None:
    """Skipping the old-log-prob pass changes nothing the update sees: the same old
    log-probs, KL and returns as the precomputed path; the KL in the reward refuses it."""
    algo = algorithm(kl_in_reward=False, kl_estimator="k3")
    assert old_log_probs_from_update(algo, updates_per_rollout=1)
    assert not old_log_probs_from_update(algo, updates_per_rollout=2)
    assert not old_log_probs_from_update(algorithm(kl_in_reward=True), updates_per_rollout=1)
    samples = rollout(setup, algo).samples
    args = (samples, setup.policy, setup.reference, setup.encoder, algo)
    precomputed = prepare_micro_batches(*args)
    skipped = prepare_micro_batches(*args, skip_old_log_probs=True)
    assert all(mb.old_log_probs is None for mb in skipped)
    for index, (full, lazy) in enumerate(zip(precomputed, skipped, strict=True)):
        assert_close(lazy.advantages, full.advantages, f"returns of micro-batch {index}")
        with torch.no_grad():  # the update's own forward pass, as the trainer's loop runs it
            current = response_log_probs(setup.policy, lazy.batch, algo.temperature)
        assert full.old_log_probs is not None
        assert_close(lazy.old_or(current), full.old_log_probs, f"old log-probs of {index}")
        assert_close(lazy.kl, full.kl, f"KL metric of micro-batch {index}")
        assert_close(full.old_or(current * 2), full.old_log_probs, "precomputed ones stay")
    assert mean_kl(skipped) == pytest.approx(mean_kl(precomputed), abs=1e-6)
    with pytest.raises(ValueError, match="KL in the reward"):
        prepare_micro_batches(
            samples, setup.policy, setup.reference, setup.encoder, algorithm(kl_in_reward=True),
            skip_old_log_probs=True,
        )  # fmt: skip


def test_the_step_fails_rather_than_train_on_a_prompt_over_max_prompt_length(
    setup: Setup,
) -> None:
    with pytest.raises(ValueError, match="max_prompt_length"):
        rollout(setup, algorithm(max_prompt_length=8))


def independent_values(
    critic: CriticModel, encoder: ChatEncoder, sample: ScoredSample
) -> torch.Tensor:
    """The critic's value of each response token's state from one unpadded forward pass."""
    ids = torch.cat([sample.prompt["input_ids"][0], torch.tensor(sample.response)]).unsqueeze(0)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    if "pixel_values" in sample.prompt:
        assert encoder.image_token_id is not None
        inputs["pixel_values"] = sample.prompt["pixel_values"]
        inputs["image_grid_thw"] = sample.prompt["image_grid_thw"]
        inputs["mm_token_type_ids"] = ids.eq(encoder.image_token_id).int()
    with torch.no_grad():
        hidden = critic.backbone(**inputs, use_cache=False)[0][0].double()
    start = sample.prompt["input_ids"].shape[-1] - 1
    head = critic.value_head.weight.double()
    values: torch.Tensor = (hidden[start : start + len(sample.response)] @ head.T).squeeze(-1)
    return values


def test_gae_takes_the_critics_values_of_each_response_state(setup: Setup) -> None:
    """gae: raw rewards (no group baseline), the critic's values at the positions that
    predict each response token (padding and the batch's other samples do not change them),
    GAE advantages and returns = advantages + values, against plain Python sums."""
    algo = algorithm(advantage_estimator="gae")
    samples = rollout(setup, algo).samples
    assert [s.shaped_reward for s in samples] == pytest.approx([REWARD[k] for k in kinds()])
    critic = CriticModel(copy.deepcopy(setup.policy), seed=3).eval()
    with torch.no_grad():  # values far from 0, so a wrong position or a missing V shows
        critic.value_head.weight.mul_(200.0)
    settings = CriticConfig(gamma=0.9, gae_lambda=0.8)
    mbs = prepare_micro_batches(
        samples, setup.policy, setup.reference, setup.encoder, algo,
        critic=critic, critic_config=settings,
    )  # fmt: skip
    values = list(per_sample(mbs, "values"))
    advantages = list(per_sample(mbs, "advantages"))
    returns = list(per_sample(mbs, "returns"))
    kls = list(per_sample(mbs, "kl"))
    spread = []
    for i, sample in enumerate(samples):
        value = independent_values(critic, setup.encoder, sample)
        assert_close(values[i], value, f"values of sample {i}")
        spread += value.tolist()
        rewards = [-algo.kl_coef * float(k) for k in kls[i]]
        rewards[-1] += sample.reward
        v = [*value.tolist(), 0.0]
        expected, running = [0.0] * len(rewards), 0.0
        for t in reversed(range(len(rewards))):
            delta = rewards[t] + settings.gamma * v[t + 1] - v[t]
            running = delta + settings.gamma * settings.gae_lambda * running
            expected[t] = running
        assert_close(advantages[i], torch.tensor(expected), f"advantages of sample {i}")
        assert_close(returns[i], torch.tensor(expected) + value, f"returns of sample {i}")
    assert max(spread) - min(spread) > 0.1  # the values are not all alike
    for mb in mbs:  # padding stays zero
        pad = 1 - mb.batch.response_mask
        assert mb.values is not None and mb.returns is not None
        assert float((mb.values * pad).abs().sum() + (mb.returns * pad).abs().sum()) == 0.0
    with pytest.raises(ValueError, match="gae needs the critic"):
        prepare_micro_batches(samples, setup.policy, setup.reference, setup.encoder, algo)
