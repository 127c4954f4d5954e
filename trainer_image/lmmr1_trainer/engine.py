"""The policy's training engine: DeepSpeed (ZeRO-2/3, gradient checkpointing, bf16 on GPU).

On GPU: NCCL, bf16, the configured ZeRO stage. On CPU (`trainer.gpus_per_node: 0`): set
DS_ACCELERATOR=cpu before DeepSpeed is imported, gloo, fp32 — DeepSpeed still partitions the
optimizer state (ZeRO-2) and does the accumulation, clipping and scheduling. The optimizer
is torch's AdamW handed to DeepSpeed (its fused CUDA/CPU Adam ops need building).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmmr1_trainer.algorithms import cosine_lr_multiplier
from lmmr1_trainer.config import DEFAULT_COLLECTIVE_TIMEOUT_S, AlgorithmConfig
from lmmr1_trainer.models import freeze

logger = logging.getLogger(__name__)
DS_TAG = "deepspeed"
CPU_ZERO3_ENV = "LMMR1_CPU_ZERO3"  # 1: a CPU engine runs algorithm.zero_stage 3 as asked


class EngineConfigError(ValueError):
    """Batch sizes or settings that cannot work together; the message names the fields."""


@dataclass(frozen=True)
class BatchPlan:
    """How one rollout batch becomes optimizer updates."""

    samples_per_rollout: int  # rollout_batch_size x samples_per_prompt
    updates_per_rollout: int  # epochs_per_rollout x samples / train_batch_size
    micro_batches_per_update: int  # per rank: gradient accumulation steps
    samples_per_rank: int  # per rollout


def plan_batches(algo: AlgorithmConfig, world_size: int) -> BatchPlan:
    samples = algo.rollout_batch_size * algo.samples_per_prompt
    per_update = algo.micro_train_batch_size * world_size
    if algo.train_batch_size % per_update:
        raise EngineConfigError(
            f"algorithm.train_batch_size ({algo.train_batch_size}) must be a multiple of "
            f"micro_train_batch_size x data-parallel ranks ({per_update})"
        )
    if samples % algo.train_batch_size:
        raise EngineConfigError(
            f"rollout_batch_size x samples_per_prompt ({samples}) must be a multiple of "
            f"algorithm.train_batch_size ({algo.train_batch_size})"
        )
    return BatchPlan(
        samples_per_rollout=samples,
        updates_per_rollout=algo.epochs_per_rollout * samples // algo.train_batch_size,
        micro_batches_per_update=algo.train_batch_size // per_update,
        samples_per_rank=samples // world_size,
    )


def zero_stage(algo: AlgorithmConfig, on_gpu: bool) -> int:
    """The ZeRO stage the engine runs: `algo.zero_stage` on GPU; on CPU at most 2 (what CPU
    stages, the test bed's and the demo's, have always run) unless `CPU_ZERO3_ENV` is 1.
    DeepSpeed's ZeRO-3 works on CPU with gloo; the switch is for tests of what only ZeRO-3
    does (parameters partitioned across ranks and gathered module by module)."""
    if on_gpu or os.environ.get(CPU_ZERO3_ENV) == "1":
        return algo.zero_stage
    return min(algo.zero_stage, 2)


def deepspeed_config(algo: AlgorithmConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    plan = plan_batches(algo, world_size)
    stage = zero_stage(algo, on_gpu)
    return {
        "train_batch_size": algo.train_batch_size,
        "train_micro_batch_size_per_gpu": algo.micro_train_batch_size,
        "gradient_accumulation_steps": plan.micro_batches_per_update,
        "gradient_clipping": algo.grad_clip,
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": on_gpu,
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e7,
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "bf16": {"enabled": bool(algo.bf16 and on_gpu)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def setup_distributed(
    on_gpu: bool, collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
) -> tuple[int, int, int]:
    """(rank, local rank, world size). Without torchrun's env, a world of one on a free port.

    Every collective of the default process group fails after `collective_timeout_s`
    (`trainer.collective_timeout_s`) instead of DeepSpeed's 10 minutes. On GPU the rank's
    local GPU is the current CUDA device before the group exists: NCCL's object
    collectives and barriers use it (see `lmmr1_trainer.collectives`)."""
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(
            {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
        )
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_gpu:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(
        dist_backend="nccl" if on_gpu else "gloo",
        timeout=datetime.timedelta(seconds=collective_timeout_s),
    )
    return int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"])


def gather_state_dict(module: Any) -> dict[str, torch.Tensor]:
    """Every weight of an unpartitioned module (ZeRO <= 2), copied to CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def weight_digest(module: Any) -> str:
    """SHA-256 of every parameter's bytes, in name order: equal digests = identical weights."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class PolicyEngine:
    """The DeepSpeed-wrapped policy with its optimizer and cosine schedule."""

    def __init__(
        self,
        model: Any,
        algo: AlgorithmConfig,
        world_size: int,
        total_updates: int,
        on_gpu: bool,
    ) -> None:
        import deepspeed

        self.on_gpu = on_gpu
        self.zero_stage = zero_stage(algo, on_gpu)
        try:  # before DeepSpeed partitions them: frozen parameters get no optimizer state
            frozen = freeze(model, algo.freeze_prefix)
        except ValueError as err:
            raise EngineConfigError(f"algorithm.freeze_prefix: {err}") from err
        if frozen:
            logger.info("froze %d parameters (prefixes %s)", len(frozen), algo.freeze_prefix)
        if algo.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.config.use_cache = False
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=algo.learning_rate,
            betas=(0.9, 0.95),
            weight_decay=0.0,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda update: cosine_lr_multiplier(
                update, total_updates, algo.warmup_ratio, algo.min_lr_ratio
            ),
        )
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=schedule,
            config=deepspeed_config(algo, world_size, on_gpu),
        )

    @property
    def module(self) -> Any:
        return self.engine.module

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """One micro-batch; DeepSpeed steps the optimizer at the accumulation boundary."""
        self.engine.backward(loss)
        self.engine.step()

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def full_state_dict(self, rank: int) -> dict[str, torch.Tensor] | None:
        """Every weight, on CPU, on rank 0 (collective under ZeRO-3: call on every rank)."""
        if self.zero_stage == 3:
            import deepspeed

            result: dict[str, torch.Tensor] = {}
            for name, param in self.module.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    if rank == 0:
                        result[name] = param.detach().to("cpu", copy=True)
            return result if rank == 0 else None
        if rank != 0:
            return None
        return gather_state_dict(self.module)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every weight, on the policy's device, one at a time, on every rank (collective
        under ZeRO-3: every rank iterates to the end). Under ZeRO <= 2 these are the
        parameters themselves (no copy): the consumer copies them before the next step."""
        if self.zero_stage == 3:
            import deepspeed

            for name, param in self.module.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    gathered = param.detach().clone()
                yield name, gathered
            return
        for name, tensor in self.module.state_dict().items():
            yield name, tensor.detach()

    def save_state(self, directory: Path) -> None:
        """Optimizer, scheduler and ZeRO partitions (collective: every rank writes its shard)."""
        self.engine.save_checkpoint(str(directory), tag=DS_TAG)

    def load_state(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {directory}")
