"""Room for checkpoint staging on a node's scratch volume, checked before the first step.

Every node stages its ranks' DeepSpeed shards (and node 0 the Hugging Face model folder)
in one scratch folder before uploading them, and a resumed stage downloads the same amount
there first. A volume too small for that fails only when the first checkpoint is written,
hours in, so the trainer compares the estimate with the room it has at start and stops
with a configuration error (exit 78) that names the field to raise.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
# What DeepSpeed writes per parameter for a ZeRO-partitioned optimizer: the fp32 master
# weights and Adam's two moments (12 bytes), plus the module weights in the training dtype.
OPTIMIZER_BYTES_PER_PARAM = 12
# A checkpoint being staged while the previous one's resume copy is still there (a
# resumed stage keeps its download until the stage ends) needs room for two.
COPIES = 2


@dataclass(frozen=True)
class Layout:
    world_size: int  # ranks in the stage
    ranks_on_node: int  # ranks sharing this node's scratch volume
    first_node: bool  # node 0 also writes the Hugging Face model folder
    zero_stage: int
    weight_bytes: int  # bytes per weight in the training dtype (2 for bf16, 4 for fp32)


def checkpoint_bytes(parameters: int, layout: Layout, models: int = 1) -> int:
    """Bytes one checkpoint of `models` models of `parameters` each puts on this node."""
    per_param = OPTIMIZER_BYTES_PER_PARAM + layout.weight_bytes
    if layout.zero_stage == 0:  # rank 0 saves the whole, unpartitioned state
        shards = per_param * parameters if layout.first_node else 0
    else:
        shards = per_param * parameters * layout.ranks_on_node // layout.world_size
    hf_folder = layout.weight_bytes * parameters if layout.first_node else 0
    return models * (shards + hf_folder)


def room(folder: Path, limit_bytes: int | None) -> int:
    """Free bytes in `folder`: the file system's free space, capped by the volume's size
    limit (an emptyDir's sizeLimit is enforced by eviction, not by the file system)."""
    free = shutil.disk_usage(folder).free
    if limit_bytes is None:
        return free
    used = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return min(free, max(limit_bytes - used, 0))


def shortfall(folder: Path, needed: int, limit_bytes: int | None) -> str | None:
    """Why `folder` cannot stage checkpoints of `needed` bytes, or None when it can."""
    available = room(folder, limit_bytes)
    if available >= COPIES * needed:
        return None
    return (
        f"the scratch volume ({folder}) has {available / GIB:.1f} GiB "
        f"free, and staging checkpoints of this model on this node needs about "
        f"{COPIES * needed / GIB:.1f} GiB ({COPIES} x {needed / GIB:.1f} GiB): raise "
        "spec.stages[].resources.trainer.scratchSize (and give the nodes that much "
        "ephemeral storage)"
    )
