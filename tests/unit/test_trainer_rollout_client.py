"""The trainer's rollout client against several real rollout servers (in process, the real
HTTP protocol) whose answers name their prompt: every result must come back to the prompt it
answers, whatever the split across servers, failures and retries. A result paired with the
wrong prompt would be scored against another prompt's label in training."""

from __future__ import annotations

import socket

import pytest
from tests.scripted_rollout import (
    ALWAYS,
    TOKEN,
    Chat,
    ScriptedBackend,
    serving,
    user_text,
)

from lmmr1_trainer.rollout.client import RolloutClient, RolloutError
from lmmr1_trainer.rollout.protocol import (
    PromptResult,
    Sample,
    SamplingParams,
    prompt_seed,
    sample_seed,
)

SEED = 1000
N = 3


def echo(chat: Chat, k: int, seed: int | None) -> Sample:
    """Sample k of a prompt: its text names the prompt, the sample and the request's seed."""
    return Sample(
        token_ids=[k], logprobs=[-0.5], text=f"{user_text(chat)}#{k}@{seed}", finish_reason="stop"
    )


def prompts(count: int) -> list[Chat]:
    """Prompts of different lengths, each with its own marker."""
    return [[{"role": "user", "content": f"prompt-{i}" + "x" * (i % 4)}] for i in range(count)]


def dead_url() -> str:
    """A loopback port nobody listens on (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_paired(chats: list[Chat], results: list[PromptResult]) -> None:
    """Result i answers prompt i with N samples, sample k drawn with the seed of (prompt i,
    sample k) in the whole step, whichever server drew it."""
    assert len(results) == len(chats)
    for i, (chat, result) in enumerate(zip(chats, results, strict=True)):
        marker = user_text(chat)
        assert result.prompt_token_ids == [len(marker)], (i, result)
        assert [s.text for s in result.samples] == [
            f"{marker}#{k}@{sample_seed(SEED, i, k)}" for k in range(N)
        ], f"result {i} does not answer prompt {i}"


def served(backend: ScriptedBackend) -> list[list[str]]:
    return [[user_text(chat) for chat in request.prompts] for request in backend.requests]


def test_sample_seeds_are_the_prompts_seed_plus_the_sample_index() -> None:
    """What vLLM does with one request of n samples seeded s (sample j gets s + j), so an
    engine draws a prompt's samples in one request; seeds stay distinct and in 63 bits."""
    seeds = {sample_seed(SEED, i, k) for i in range(200) for k in range(16)}
    assert len(seeds) == 200 * 16 and max(seeds) < 2**63
    assert all(sample_seed(SEED, 7, k) == prompt_seed(SEED, 7) + k for k in range(16))
    assert prompt_seed(SEED, 7) != prompt_seed(SEED + 1, 7) != prompt_seed(SEED, 8)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 10])
def test_each_result_answers_its_own_prompt_across_three_servers(count: int) -> None:
    backends = [ScriptedBackend(echo) for _ in range(3)]
    chats = prompts(count)
    with serving(*backends) as servers:
        client = RolloutClient([s.url for s in servers], TOKEN, backoff_s=0)
        results, _ = client.generate(chats, SamplingParams(n=N, seed=SEED))
    chunk = -(-count // 3)
    assert_paired(chats, results)
    # Contiguous shards, one request per server that has one, in server order.
    markers = [user_text(c) for c in chats]
    for index, backend in enumerate(backends):
        shard = markers[index * chunk : (index + 1) * chunk]
        assert served(backend) == ([shard] if shard else [])


def test_a_failing_servers_shard_is_retried_on_the_next_server_and_stays_in_place() -> None:
    # Server 1 always fails (HTTP 500): its shard goes to server 2, which also serves its own.
    backends = [ScriptedBackend(echo), ScriptedBackend(echo, fail=ALWAYS), ScriptedBackend(echo)]
    chats = prompts(8)  # shards of 3, 3, 2
    with serving(*backends) as servers:
        client = RolloutClient([s.url for s in servers], TOKEN, backoff_s=0)
        results, _ = client.generate(chats, SamplingParams(n=N, seed=SEED))
    # The retried shard keeps its seeds: sampling does not depend on which server served it.
    assert_paired(chats, results)
    markers = [user_text(c) for c in chats]
    assert backends[1].failures >= 1 and served(backends[1]) == []
    assert served(backends[0]) == [markers[0:3]]
    assert sorted(served(backends[2])) == sorted([markers[3:6], markers[6:8]])


def test_a_server_never_serves_two_generate_calls_at_once() -> None:
    # Server 1 always fails: its shard is retried on server 2 while server 2 is busy with
    # its own, and must wait for it.
    backends = [
        ScriptedBackend(echo, delay_s=0.3),
        ScriptedBackend(echo, fail=ALWAYS),
        ScriptedBackend(echo, delay_s=0.3),
    ]
    chats = prompts(6)
    with serving(*backends) as servers:
        client = RolloutClient([s.url for s in servers], TOKEN, backoff_s=0)
        results, _ = client.generate(chats, SamplingParams(n=N, seed=SEED))
    assert_paired(chats, results)
    assert len(backends[2].requests) == 2
    assert [b.max_in_flight for b in backends] == [1, 0, 1]


def test_a_dead_server_and_a_flaky_one_still_give_results_in_prompt_order() -> None:
    # Server 0 is down (connection refused), server 1 fails its first request once.
    flaky, healthy = ScriptedBackend(echo, fail=1), ScriptedBackend(echo)
    chats = prompts(7)  # shards of 3, 3, 1
    with serving(flaky, healthy) as servers:
        urls = [dead_url(), servers[0].url, servers[1].url]
        client = RolloutClient(urls, TOKEN, retries=3, backoff_s=0)
        results, _ = client.generate(chats, SamplingParams(n=N, seed=SEED))
    assert_paired(chats, results)
    assert flaky.failures == 1


def test_the_weight_version_is_the_oldest_that_served_and_short_answers_are_errors() -> None:
    backends = [ScriptedBackend(echo) for _ in range(3)]
    with serving(*backends) as servers:
        for server, version in zip(servers, (5, 3, 4), strict=True):
            server.weight_version = version
        client = RolloutClient([s.url for s in servers], TOKEN, backoff_s=0)
        _, version = client.generate(prompts(6), SamplingParams(n=1, seed=SEED))
        assert version == 3
    # A server that answers one prompt short must fail the step, never shift the pairing.
    broken = [ScriptedBackend(echo), ScriptedBackend(echo, drop_last=True)]
    with serving(*broken) as servers:
        client = RolloutClient([s.url for s in servers], TOKEN, backoff_s=0)
        with pytest.raises(RolloutError, match="asked for 4 prompts, got 3"):
            client.generate(prompts(4), SamplingParams(n=1, seed=SEED))


def test_every_server_failing_is_an_error_naming_each_attempt() -> None:
    backends = [ScriptedBackend(echo, fail=ALWAYS) for _ in range(2)]
    with serving(*backends) as servers:
        client = RolloutClient([s.url for s in servers], TOKEN, retries=3, backoff_s=0)
        with pytest.raises(RolloutError, match="generate failed 3 times") as failure:
            client.generate(prompts(2), SamplingParams(n=1, seed=SEED))
    assert str(failure.value).count("500: RuntimeError: scripted failure") == 3
