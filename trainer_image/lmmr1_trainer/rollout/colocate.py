"""Colocated rollouts (`rollout.mode: colocate`, the paper's layout): every trainer rank
owns a vLLM engine in its own process.

Rank 0 drives a step as with rollout servers (`generate`, the `Rollouts` interface): it
broadcasts the step's prompts and sampling settings, every rank generates its contiguous
share on its own engine (`first_index` keeps each sample's seed independent of the split),
and rank 0 gathers the results in prompt order. The other ranks take part through
`follow_step`. After each update every rank loads the policy's new weights into its own
engine, straight from the trainer's tensors (`VllmEngine.update_weights`). On GPU the
engines sleep while the policy trains (`sleep`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from lmmr1_trainer.collectives import broadcast_object, gather_objects
from lmmr1_trainer.rollout.protocol import GenerateRequest, PromptResult, SamplingParams
from lmmr1_trainer.rollout.vllm_backend import VllmEngine

logger = logging.getLogger(__name__)


def shard_bounds(count: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of `rank`'s contiguous share of `count` prompts (ceil-sized shares)."""
    chunk = -(-count // world)
    return min(rank * chunk, count), min((rank + 1) * chunk, count)


class ColocatedRollout:
    def __init__(self, engine: VllmEngine, rank: int, world: int) -> None:
        self.engine = engine
        self.rank = rank
        self.world = world
        self.weight_version = 0

    def _generate_share(
        self, prompts: list[list[dict[str, Any]]], sampling: SamplingParams
    ) -> list[PromptResult]:
        start, end = shard_bounds(len(prompts), self.world, self.rank)
        if start == end:
            return []
        request = GenerateRequest(prompts=prompts[start:end], sampling=sampling, first_index=start)
        return self.engine.generate(request)

    def generate(
        self, prompts: list[list[dict[str, Any]]], sampling: SamplingParams
    ) -> tuple[list[PromptResult], int]:
        """Rank 0: every rank's share, in prompt order, and the weight version that drew it."""
        if self.world == 1:
            return self._generate_share(prompts, sampling), self.weight_version
        broadcast_object((prompts, sampling.model_dump()), self.rank)
        mine = self._generate_share(prompts, sampling)
        gathered = gather_objects(mine, self.rank) or []
        results = [result for share in gathered for result in share]
        if len(results) != len(prompts):
            raise RuntimeError(f"asked for {len(prompts)} prompts, got {len(results)} results")
        return results, self.weight_version

    def follow_step(self) -> None:
        """Ranks > 0: generate this rank's share of the prompts rank 0 broadcasts."""
        step: tuple[list[list[dict[str, Any]]], dict[str, Any]] = broadcast_object(None, self.rank)
        prompts, sampling = step
        mine = self._generate_share(prompts, SamplingParams.model_validate(sampling))
        gather_objects(mine, self.rank)

    def sleep(self) -> None:
        self.engine.sleep()

    def push(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Every rank: the policy's weights into this rank's engine."""
        count = self.engine.update_weights(named)
        self.weight_version = version
        logger.info("weights v%d loaded into the colocated engine (%d tensors)", version, count)
