"""Pushing the policy's new weights to the rollout servers after each rollout batch's updates.

- `HttpWeightSync` (CPU, and any back end): rank 0 serialises the full state dict with
  safetensors and POSTs it to every server's token-guarded `/update_weights`.
- `NcclWeightSync` (GPU with the vLLM back end; UNTESTED here): rank 0 is rank 0 of an NCCL
  group with every vLLM worker (vLLM's `StatelessProcessGroup` + `PyNcclCommunicator`), posts
  the tensors' names/dtypes/shapes to `/receive_weights` and broadcasts each tensor.
  Its master port is $LMMR1_WEIGHT_SYNC_PORT (default 51216, as TRL's vllm-serve).

Each push has a deadline (`rollout.weight_sync_timeout_s`): a server that never answers, or
an NCCL broadcast whose peer is gone, fails the attempt (`WeightSyncTimeout`) instead of
hanging the trainer.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Protocol

import torch

from lmmr1_trainer.config import DEFAULT_WEIGHT_SYNC_TIMEOUT_S
from lmmr1_trainer.deadline import within
from lmmr1_trainer.rollout.client import RolloutClient

logger = logging.getLogger(__name__)
WEIGHT_SYNC_PORT_ENV = "LMMR1_WEIGHT_SYNC_PORT"
DEFAULT_WEIGHT_SYNC_PORT = 51216


WEIGHT_SYNC_TIMEOUT = "WeightSyncTimeout"  # the reason an overdue push fails the attempt


class WeightSync(Protocol):
    def push(self, state_dict: dict[str, torch.Tensor], version: int) -> None: ...


def serialise(state_dict: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    # Tied weights share storage, which safetensors refuses: give each its own.
    return save({k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()})


class HttpWeightSync:
    def __init__(
        self, client: RolloutClient, timeout_s: float = DEFAULT_WEIGHT_SYNC_TIMEOUT_S
    ) -> None:
        self.client = client
        self.timeout_s = timeout_s

    def push(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        payload = serialise(state_dict)
        answers = within(
            self.timeout_s,
            WEIGHT_SYNC_TIMEOUT,
            f"pushing weights v{version} to {len(self.client.urls)} rollout server(s)",
            lambda: self.client.update_weights(payload, version),
        )
        logger.info("weights v%d pushed to %d rollout server(s)", version, len(answers))


class NcclWeightSync:
    def __init__(
        self,
        client: RolloutClient,
        tensor_parallel_size: int,
        timeout_s: float = DEFAULT_WEIGHT_SYNC_TIMEOUT_S,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "NCCL weight sync needs a CUDA device on the trainer; on CPU the trainer "
                "pushes weights over HTTP (rollout.backend: transformers)"
            )
        try:
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup
        except ImportError as err:
            raise RuntimeError(
                "NCCL weight sync uses vLLM's communicator: install the `gpu` extra in the "
                "trainer image"
            ) from err
        self.client = client
        self.timeout_s = timeout_s
        self.errors: list[str] = []
        address = os.environ.get("POD_IP") or os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(os.environ.get(WEIGHT_SYNC_PORT_ENV, DEFAULT_WEIGHT_SYNC_PORT))
        world = 1 + tensor_parallel_size * len(client.urls)
        joins = [
            self._post(
                url,
                "/init_weight_sync",
                {
                    "master_address": address,
                    "master_port": port,
                    "rank_offset": 1 + i * tensor_parallel_size,
                    "world_size": world,
                },
            )
            for i, url in enumerate(client.urls)
        ]
        device = torch.cuda.current_device()

        def join_group() -> Any:
            group = StatelessProcessGroup.create(host=address, port=port, rank=0, world_size=world)
            return PyNcclCommunicator(group, device=device)

        what = f"joining the NCCL weight-sync group of {len(client.urls)} rollout server(s)"
        self.comm = within(timeout_s, WEIGHT_SYNC_TIMEOUT, what, join_group)
        within(timeout_s, WEIGHT_SYNC_TIMEOUT, what, lambda: self._join(joins))

    def _post(self, url: str, route: str, body: dict[str, Any]) -> threading.Thread:
        """POST in the background: the server answers only once the collective is done."""

        def run() -> None:
            try:
                self.client.post_json(url, route, body)
            except Exception as err:
                self.errors.append(f"{url}{route}: {err}")
                logger.error("%s%s failed: %s", url, route, err)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def _join(self, threads: list[threading.Thread]) -> None:
        for thread in threads:
            thread.join()
        if self.errors:
            raise RuntimeError("NCCL weight sync failed: " + "; ".join(self.errors))

    def push(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        what = f"broadcasting weights v{version} to {len(self.client.urls)} rollout server(s)"
        within(self.timeout_s, WEIGHT_SYNC_TIMEOUT, what, lambda: self._push(state_dict, version))

    def _push(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        names = list(state_dict)
        body = {
            "names": names,
            "dtypes": [str(state_dict[n].dtype).removeprefix("torch.") for n in names],
            "shapes": [list(state_dict[n].shape) for n in names],
            "weight_version": version,
        }
        receivers = [self._post(url, "/receive_weights", body) for url in self.client.urls]
        stream = torch.cuda.current_stream()
        for name in names:
            self.comm.broadcast(state_dict[name].to("cuda"), src=0, stream=stream)
        stream.synchronize()
        self._join(receivers)


def make_weight_sync(
    client: RolloutClient, backend: str, tensor_parallel_size: int, on_gpu: bool, timeout_s: float
) -> WeightSync:
    if backend == "vllm" and on_gpu:
        return NcclWeightSync(client, tensor_parallel_size, timeout_s)
    return HttpWeightSync(client, timeout_s)
