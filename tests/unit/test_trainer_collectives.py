"""`lmmr1_trainer.collectives` across real ranks, on CPU (issue 13).

Under NCCL a tensor collective accepts tensors on the GPU only: whitening all-reduced the
advantages' CPU sums and the first GPU step failed with "No backend type associated with
device type cpu". Gloo, the only backend here, reduces CPU tensors, so a plain gloo test
cannot tell a collective on the engine's device from one on the CPU. These tests give two
ranks a process group that behaves like NCCL in that respect: `AcceleratorOnlyGroup`, a
Python process group (`Backend.register_backend`) that refuses, with NCCL's message, every
tensor that is not on its accelerator, and reduces the ones that are with gloo (a copy to
the CPU and back). The accelerator is torch's lazy-tensor device (`torch.device("lazy")`,
the TorchScript back end that every torch build carries): a device type other than "cpu"
whose tensors hold real values on a CPU-only machine. The engine's device in these ranks
is that device, as `engine.device` would be `cuda:N` on a GPU. Whitening as it was
(`dist.all_reduce` on the CPU tensors it builds) fails here with NCCL's error; whitening
through `collectives.all_reduce_sum(..., engine.device)` passes and equals whitening over
both ranks' tokens, with the advantages back on the CPU.

The object collectives and the barrier run under plain gloo (they pickle into CPU tensors
there; see the module's docstring for NCCL), and `engine.setup_distributed` gives the
process group the stage config's `trainer.collective_timeout_s`.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pydantic import ValidationError

from lmmr1_trainer.config import DEFAULT_COLLECTIVE_TIMEOUT_S, TrainerTopology

WORLD = 2
BACKEND = "accelerator_only"
ACCELERATOR = torch.device("lazy")
DISTRIBUTED_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


class AcceleratorOnlyGroup(dist.ProcessGroup):
    """All-reduce for tensors on ACCELERATOR only, as NCCL for CUDA tensors; gloo does the
    arithmetic on CPU copies."""

    def __init__(self, store: Any, rank: int, size: int, timeout: datetime.timedelta) -> None:
        super().__init__(rank, size)
        self.gloo = dist.ProcessGroupGloo(store, rank, size, timeout)

    def allreduce(self, tensors: list[torch.Tensor], opts: Any) -> Any:
        for tensor in tensors:
            if tensor.device.type != ACCELERATOR.type:
                raise RuntimeError(
                    f"No backend type associated with device type {tensor.device.type}"
                )
        on_cpu = [tensor.to("cpu") for tensor in tensors]
        work = self.gloo.allreduce(on_cpu, opts)
        work.wait()
        for tensor, reduced in zip(tensors, on_cpu, strict=True):
            tensor.copy_(reduced)
        return work

    def getBackendName(self) -> str:
        return BACKEND


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_ranks(target: Any, *args: Any, nprocs: int = WORLD) -> None:
    """`target(rank, *args)` in `nprocs` fresh processes; a rank's exception fails the test
    with that rank's traceback."""
    mp.start_processes(target, args=args, nprocs=nprocs, start_method="spawn")


def rank_micro_batches(rank: int) -> list[SimpleNamespace]:
    """Rank-specific advantages and masks (what `whiten_across_ranks` reads of a micro-batch);
    padding positions hold values that must not count."""
    generator = torch.Generator().manual_seed(rank)
    batches = []
    for length in (3 + rank, 5):
        mask = torch.zeros(2, 6)
        mask[0, :length] = 1
        mask[1, : length - 2] = 1
        advantages = torch.randn(2, 6, generator=generator) * (rank + 1) + 3 * rank
        batches.append(
            SimpleNamespace(batch=SimpleNamespace(response_mask=mask), advantages=advantages)
        )
    return batches


def _whitening_rank(rank: int, port: int, out: Path) -> None:
    import torch._lazy.ts_backend

    from lmmr1_trainer.collectives import all_reduce_sum
    from lmmr1_trainer.experience import whiten_across_ranks

    torch._lazy.ts_backend.init()
    dist.Backend.register_backend(BACKEND, AcceleratorOnlyGroup, devices=[ACCELERATOR.type])
    dist.init_process_group(
        BACKEND,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        batches = rank_micro_batches(rank)
        engine_device = ACCELERATOR  # `engine.device`, as the trainer passes it
        whiten_across_ranks(batches, engine_device)
        mine = torch.tensor([float(rank + 1), 10.0])
        total = all_reduce_sum(mine, engine_device)
        torch.save(
            {
                "advantages": [mb.advantages for mb in batches],
                "devices": [str(mb.advantages.device) for mb in batches],
                "total": total,
                "total_device": str(total.device),
                "mine_after": mine,
            },
            out / f"rank-{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_whitening_reduces_on_the_engines_device_and_hands_back_cpu_tensors(
    tmp_path: Path,
) -> None:
    run_ranks(_whitening_rank, free_port(), tmp_path)
    results = [torch.load(tmp_path / f"rank-{r}.pt") for r in range(WORLD)]
    tokens = torch.cat(
        [
            mb.advantages[mb.batch.response_mask.bool()]
            for r in range(WORLD)
            for mb in rank_micro_batches(r)
        ]
    ).double()
    mean, std = tokens.mean(), tokens.std(unbiased=False)
    for rank, result in enumerate(results):
        assert result["devices"] == ["cpu", "cpu"]  # the caller's device
        for mb, whitened in zip(rank_micro_batches(rank), result["advantages"], strict=True):
            mask = mb.batch.response_mask
            expected = ((mb.advantages.double() - mean) / std).float() * mask
            torch.testing.assert_close(whitened, expected, rtol=1e-5, atol=1e-5)
        assert result["total_device"] == "cpu"
        assert result["total"].tolist() == [3.0, 20.0]  # both ranks' sums
        assert result["mine_after"].tolist() == [float(rank + 1), 10.0]  # input untouched


def _objects_rank(rank: int, port: int) -> None:
    from lmmr1_trainer import collectives

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        assert collectives.world_size() == WORLD
        assert collectives.broadcast_object({"steps": 7} if rank == 0 else None, rank) == {
            "steps": 7
        }
        items = list(range(6)) if rank == 0 else None
        assert collectives.scatter_objects(items, rank) == [3 * rank, 3 * rank + 1, 3 * rank + 2]
        gathered = collectives.gather_objects(f"rank {rank}", rank)
        assert gathered == (["rank 0", "rank 1"] if rank == 0 else None)
        assert collectives.all_gather_objects(rank * 10) == [0, 10]
        collectives.barrier()
    finally:
        dist.destroy_process_group()


def test_object_collectives_and_the_barrier_across_two_ranks() -> None:
    run_ranks(_objects_rank, free_port())


def test_without_a_process_group_every_helper_is_local() -> None:
    from lmmr1_trainer import collectives

    assert not dist.is_initialized()
    assert collectives.world_size() == 1
    mine = torch.tensor([1.0, 2.0])
    total = collectives.all_reduce_sum(mine, "cpu")
    assert total.tolist() == [1.0, 2.0]
    total += 1
    assert mine.tolist() == [1.0, 2.0]  # a copy, as with several ranks
    assert collectives.broadcast_object(5, 0) == 5
    assert collectives.scatter_objects([1, 2], 0) == [1, 2]
    assert collectives.scatter_objects(None, 0) == []
    assert collectives.gather_objects("x", 0) == ["x"]
    assert collectives.all_gather_objects("x") == ["x"]
    collectives.barrier()


def _timeout_rank(rank: int, timeout_s: float, out: Path) -> None:
    from lmmr1_trainer.engine import setup_distributed

    for name in DISTRIBUTED_ENV:  # a world of one on a free port, as in a plain process
        os.environ.pop(name, None)
    setup_distributed(on_gpu=False, collective_timeout_s=timeout_s)
    try:
        backend = dist.group.WORLD._get_backend(torch.device("cpu"))
        (out / "timeout").write_text(str(backend.options._timeout.total_seconds()))
    finally:
        dist.destroy_process_group()


def test_the_stage_configs_collective_timeout_reaches_the_process_group(tmp_path: Path) -> None:
    run_ranks(_timeout_rank, 1234.5, tmp_path, nprocs=1)
    assert float((tmp_path / "timeout").read_text()) == 1234.5


def test_the_collective_timeout_defaults_to_an_hour_and_must_be_positive() -> None:
    assert TrainerTopology().collective_timeout_s == DEFAULT_COLLECTIVE_TIMEOUT_S == 3600
    assert TrainerTopology(collective_timeout_s=90).collective_timeout_s == 90
    with pytest.raises(ValidationError, match="collective_timeout_s"):
        TrainerTopology(collective_timeout_s=0)
