"""Rollout servers for unit tests: the real `RolloutServer` (HTTP, the real protocol) in this
process, over a scripted back end whose answers say which prompt they belong to.

`ScriptedBackend(answer)` calls `answer(chat, sample_index, seed)` for every sample (`seed`:
the sample's own seed, as a real engine derives it from the request) and records each
request it serves and how many it served at once; `fail` makes it fail (HTTP 500) a number
of times, or always; `delay_s` holds every request that long.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from lmmr1_trainer.rollout.backends import BackendUnavailable
from lmmr1_trainer.rollout.protocol import (
    GenerateRequest,
    NcclInitRequest,
    NcclUpdateRequest,
    PromptResult,
    Sample,
    sample_seed,
)
from lmmr1_trainer.rollout.server import RolloutServer

TOKEN = "scripted-token"
ALWAYS = -1

Chat = list[dict[str, Any]]
# (chat, index of the sample, the request's seed) -> the sample
Answer = Callable[[Chat, int, int | None], Sample]


def user_text(chat: Chat) -> str:
    """The text of a chat's last user turn (string or typed content)."""
    content = next(m for m in reversed(chat) if m["role"] == "user")["content"]
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")


@dataclass
class ScriptedBackend:
    answer: Answer
    fail: int = 0  # fail this many requests (HTTP 500) before answering; ALWAYS: never answer
    drop_last: bool = False  # answer one prompt short (a broken server)
    name: str = "scripted"
    requests: list[GenerateRequest] = field(default_factory=list)
    failures: int = 0
    delay_s: float = 0.0
    in_flight: int = 0
    max_in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def generate(self, request: GenerateRequest) -> list[PromptResult]:
        with self._lock:
            if self.fail == ALWAYS or self.failures < self.fail:
                self.failures += 1
                raise RuntimeError("scripted failure")
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)
            seed = request.sampling.seed
            results = [
                PromptResult(
                    prompt_token_ids=[len(user_text(chat))],
                    samples=[
                        self.answer(
                            chat,
                            k,
                            None if seed is None else sample_seed(seed, request.first_index + i, k),
                        )
                        for k in range(request.sampling.n)
                    ],
                )
                for i, chat in enumerate(request.prompts)
            ]
        finally:
            with self._lock:
                self.in_flight -= 1
        return results[:-1] if self.drop_last else results

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> int:
        return len(tensors)

    def init_nccl(self, request: NcclInitRequest) -> None:
        raise BackendUnavailable("scripted back end: no NCCL")

    def receive_nccl(self, request: NcclUpdateRequest) -> int:
        raise BackendUnavailable("scripted back end: no NCCL")


@contextmanager
def serving(*backends: ScriptedBackend) -> Iterator[list[RolloutServer]]:
    """One in-process rollout server per back end, on free loopback ports."""
    servers = [RolloutServer(("127.0.0.1", 0), backend, TOKEN) for backend in backends]
    for server in servers:
        threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    try:
        yield servers
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
