"""Every torch.distributed call of the trainer, in one place, on the accelerator's device.

Tensor collectives run on the device the caller names: the policy engine's
(`engine.device`). NCCL reduces CUDA tensors only (a CPU tensor fails with "No backend type
associated with device type cpu"), gloo CPU ones, so `all_reduce_sum` copies its input
there, reduces, and hands the result back on the input's device.

Object collectives (`broadcast_object`, `scatter_objects`, ...) pickle into a byte tensor
that torch places on the current CUDA device under NCCL (`torch.cuda.current_device()`, not
an argument of most of them), and so does a barrier without a bound device:
`engine.setup_distributed` sets each rank's local GPU as current before the process group
exists, or every rank of a node would use GPU 0 (NCCL refuses two ranks on one device, or
hangs). Under gloo they stay on the CPU.

Every helper is a no-op in a world of one and without a process group (unit tests). Each
collective fails after `trainer.collective_timeout_s` instead of waiting forever: the
process group's timeout, set by `engine.setup_distributed`.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world_size() -> int:
    """The number of ranks; 1 without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def all_reduce_sum(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The element-wise sum of `tensor` over every rank, on `tensor`'s device; the reduction
    runs on `device` (the engine's). `tensor` itself is left unchanged."""
    if world_size() == 1:
        return tensor.clone()
    on_device = tensor.to(device, copy=True)
    dist.all_reduce(on_device)
    return on_device.to(tensor.device)


def broadcast_object(value: T | None, rank: int) -> T:
    """Rank 0's `value` on every rank (the others pass None)."""
    box: list[Any] = [value if rank == 0 else None]
    if world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    result: T = box[0]
    return result


def scatter_objects(items: list[Any] | None, rank: int) -> list[Any]:
    """Rank 0's `items` cut into equal contiguous shares, one per rank: this rank's share."""
    world = world_size()
    if world == 1:
        return items or []
    shards: list[Any] | None = None
    if rank == 0 and items is not None:
        size = len(items) // world
        shards = [items[r * size : (r + 1) * size] for r in range(world)]
    out: list[Any] = [None]
    dist.scatter_object_list(out, shards, src=0)
    return list(out[0])


def gather_objects(value: Any, rank: int) -> list[Any] | None:
    """Every rank's `value`, in rank order, on rank 0; None elsewhere."""
    world = world_size()
    if world == 1:
        return [value]
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    world = world_size()
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait for every rank."""
    if world_size() > 1:
        dist.barrier()
