"""The trainer's client for its rollout servers (and, in `RewardClient`, its verifier).

Prompts are split into contiguous chunks, one per server, sent in parallel; a chunk whose
server fails is retried on the next server (up to `retries` attempts in all) so one
restarting pod does not stop the step. A server never has two generate calls from this
client at once (a retried chunk waits for the server's own): its engine batches one call's
prompts, and two overlapping calls would only compete for its memory. Each chunk carries
its place in the step (`first_index`), so every sample's seed is the same whichever server
draws it. Weights go to every server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import requests

from lmmr1_trainer.config import ROLLOUT_READY_TIMEOUT_S
from lmmr1_trainer.rollout.protocol import (
    WEIGHT_VERSION_HEADER,
    GenerateRequest,
    GenerateResponse,
    PromptResult,
    SamplingParams,
    WeightUpdateResponse,
)

logger = logging.getLogger(__name__)
_T = TypeVar("_T")


class RolloutError(RuntimeError):
    """Rollout servers could not serve a request after every retry."""


class RolloutClient:
    def __init__(
        self,
        urls: list[str],
        token: str,
        timeout_s: float = 1800.0,
        retries: int = 3,
        backoff_s: float = 1.0,
    ) -> None:
        if not urls:
            raise ValueError("rollout.urls is empty: the stage needs at least one rollout server")
        self.urls = [u.rstrip("/") for u in urls]
        self.token = token
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._session = requests.Session()
        self._busy = {url: threading.Lock() for url in self.urls}

    def _with_retries(self, urls: list[str], what: str, call: Callable[[str], _T]) -> _T:
        """`call(url)` up to `retries` times, cycling through `urls`."""
        errors: list[str] = []
        for attempt in range(self.retries):
            url = urls[attempt % len(urls)]
            try:
                return call(url)
            except (requests.RequestException, ValueError) as err:
                errors.append(f"{url}: {err}")
                logger.warning("%s on %s failed (attempt %d): %s", what, url, attempt + 1, err)
                time.sleep(self.backoff_s * (attempt + 1))
        raise RolloutError(f"{what} failed {self.retries} times: " + "; ".join(errors))

    @staticmethod
    def _check(response: requests.Response) -> None:
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text
            error = requests.HTTPError(f"{response.status_code}: {message}", response=response)
            raise error

    def wait_ready(self, timeout_s: float = ROLLOUT_READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(self.urls)
        while pending:
            url = pending[0]
            try:
                if self._session.get(f"{url}/health", timeout=5).status_code == 200:
                    pending.pop(0)
                    continue
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RolloutError(f"rollout servers not ready after {timeout_s}s: {pending}")
            time.sleep(0.5)

    def generate(
        self, prompts: list[list[dict[str, Any]]], sampling: SamplingParams
    ) -> tuple[list[PromptResult], int]:
        """Results in prompt order, and the oldest weight version that served them."""
        chunk = -(-len(prompts) // len(self.urls))
        pieces = [(i, prompts[i * chunk : (i + 1) * chunk]) for i in range(len(self.urls))]
        pieces = [(i, p) for i, p in pieces if p]

        def send(index: int, chats: list[list[dict[str, Any]]]) -> GenerateResponse:
            body = GenerateRequest(
                prompts=chats, sampling=sampling, first_index=index * chunk
            ).model_dump_json()

            def call(url: str) -> GenerateResponse:
                with self._busy[url]:
                    response = self._session.post(
                        f"{url}/generate",
                        data=body,
                        headers={"Content-Type": "application/json"},
                        timeout=self.timeout_s,
                    )
                self._check(response)
                return GenerateResponse.model_validate_json(response.content)

            rotation = self.urls[index:] + self.urls[:index]
            return self._with_retries(rotation, "generate", call)

        with ThreadPoolExecutor(max_workers=len(pieces)) as pool:
            answers = list(pool.map(lambda piece: send(*piece), pieces))
        results = [r for answer in answers for r in answer.results]
        if len(results) != len(prompts):
            raise RolloutError(f"asked for {len(prompts)} prompts, got {len(results)} results")
        return results, min(a.weight_version for a in answers)

    def update_weights(self, payload: bytes, version: int) -> list[WeightUpdateResponse]:
        """Push a safetensors-serialised state dict to every server."""
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/octet-stream",
            WEIGHT_VERSION_HEADER: str(version),
        }

        def push(index: int) -> WeightUpdateResponse:
            def call(url: str) -> WeightUpdateResponse:
                response = self._session.post(
                    f"{url}/update_weights", data=payload, headers=headers, timeout=self.timeout_s
                )
                self._check(response)
                return WeightUpdateResponse.model_validate_json(response.content)

            # Every server must get the weights: retry on the same server only.
            return self._with_retries([self.urls[index]], "update_weights", call)

        with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            return list(pool.map(push, range(len(self.urls))))

    def post_json(self, url: str, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """An authorised JSON call to one server (the NCCL weight-sync routes)."""
        response = self._session.post(
            f"{url}{route}",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=self.timeout_s,
        )
        self._check(response)
        result: dict[str, Any] = response.json()
        return result


class RewardClient:
    """POST /get_reward as OpenRLHF does: 180 s timeout, 5 attempts 1 s apart."""

    def __init__(self, url: str, timeout_s: float = 180.0, attempts: int = 5) -> None:
        self.url = url.rstrip("/") + "/get_reward"
        self.timeout_s = timeout_s
        self.attempts = attempts

    def score(
        self, queries: list[str], prompts: list[str], labels: list[str]
    ) -> dict[str, list[float]]:
        body = {"query": queries, "prompts": prompts, "labels": labels}
        last: Exception | None = None
        for _ in range(self.attempts):
            try:
                response = requests.post(self.url, json=body, timeout=self.timeout_s)
                response.raise_for_status()
                data: dict[str, list[float]] = response.json()
                if len(data["rewards"]) != len(queries):
                    raise ValueError(f"{len(data['rewards'])} rewards for {len(queries)} queries")
                return data
            except (requests.RequestException, ValueError, KeyError) as err:
                last = err
                logger.warning("reward request to %s failed: %s", self.url, err)
                time.sleep(1.0)
        raise RolloutError(f"the verifier at {self.url} failed {self.attempts} times: {last}")
