"""The vLLM rollout back end (GPU only; UNTESTED on the project's CPU machines).

Generation goes through `vllm.LLM.generate` with multi-modal data; weights arrive either
over HTTP (a safetensors state dict, like the CPU back end) or by NCCL broadcast from the
trainer's rank 0: the server's workers join a `StatelessProcessGroup` + `PyNcclCommunicator`
(`/init_weight_sync`), then receive each tensor by broadcast (`/receive_weights`) and load it
with the model's own `load_weights` (which maps HF names, e.g. fused qkv). The worker side is
`WeightReceiverExtension`, passed to vLLM as `worker_extension_cls` and reached through
`LLM.collective_rpc`. Importing this module never imports vllm; constructing the back end
without vllm or CUDA raises `BackendUnavailable` with what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch

from lmmr1_trainer.models import VISION_TOKENS, ChatEncoder
from lmmr1_trainer.rollout.backends import BackendUnavailable, decode_data_images
from lmmr1_trainer.rollout.protocol import (
    GenerateRequest,
    NcclInitRequest,
    NcclUpdateRequest,
    PromptResult,
    Sample,
)

EXTENSION = "lmmr1_trainer.rollout.vllm_backend.WeightReceiverExtension"


class WeightReceiverExtension:
    """Mixed into vLLM's GPU worker (`worker_extension_cls`); methods run in every worker."""

    model_runner: Any
    device: Any

    def lmmr1_init_weight_sync(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int
    ) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_world_group
        from vllm.distributed.utils import StatelessProcessGroup

        rank = get_world_group().rank + rank_offset
        group = StatelessProcessGroup.create(
            host=master_address, port=master_port, rank=rank, world_size=world_size
        )
        self._lmmr1_comm = PyNcclCommunicator(group, device=self.device)

    def lmmr1_receive_weights(
        self, names: list[str], dtypes: list[str], shapes: list[list[int]]
    ) -> int:
        for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            self._lmmr1_comm.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
            torch.cuda.current_stream().synchronize()
            self.model_runner.model.load_weights(weights=[(name, tensor)])
        return len(names)

    def lmmr1_load_serialized(self, payload: bytes) -> int:
        from safetensors.torch import load

        tensors = load(payload)
        self.model_runner.model.load_weights(weights=list(tensors.items()))
        return len(tensors)


class VllmBackend:
    name = "vllm"

    def __init__(
        self,
        model_dir: Path,
        tensor_parallel_size: int,
        gpu_memory_utilization: float,
        load_format: str = "auto",
    ) -> None:
        """`load_format="dummy"`: random weights, no weight files (the GPU benchmark)."""
        try:
            from vllm import LLM
        except ImportError as err:
            raise BackendUnavailable(
                "rollout.backend is 'vllm' but vllm is not installed: install the `gpu` extra "
                "on a CUDA machine, or set rollout.backend: transformers for CPU"
            ) from err
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                "rollout.backend is 'vllm' but no CUDA device is visible: give the rollout pod "
                "a GPU, or set rollout.backend: transformers for CPU"
            )
        self.encoder = ChatEncoder.load(model_dir)
        self.llm = LLM(
            model=str(model_dir),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            worker_extension_cls=EXTENSION,
            enable_prefix_caching=True,
            limit_mm_per_prompt={"image": 8},
            load_format=load_format,
        )

    def generate(self, request: GenerateRequest) -> list[PromptResult]:
        from vllm import SamplingParams

        sampling = request.sampling
        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            logprobs=0,
            skip_special_tokens=False,
            stop_token_ids=self.encoder.eos_token_ids,
            bad_words=list(VISION_TOKENS) if self.encoder.vision_token_ids else None,
        )
        # Send the chat-templated text with *unexpanded* image pads: vLLM expands them itself
        # (sending expanded ids would expand them twice — the known Qwen2.5-VL pitfall).
        inputs: list[dict[str, Any]] = []
        for chat in request.prompts:
            images = decode_data_images(chat)
            item: dict[str, Any] = {"prompt": self.encoder.prompt_text(chat)}
            if images:
                item["multi_modal_data"] = {"image": images}
            inputs.append(item)
        # Plain dicts in vLLM's TextPrompt shape (vLLM is imported lazily, GPU image only).
        outputs = self.llm.generate(cast(Any, inputs), params, use_tqdm=False)
        return [self._result(output) for output in outputs]

    def _result(self, output: Any) -> PromptResult:
        samples = []
        for completion in output.outputs:
            tokens = list(completion.token_ids)
            log_probs = [
                float(step[token].logprob) if step else 0.0
                for token, step in zip(tokens, completion.logprobs or [], strict=False)
            ]
            samples.append(
                Sample(
                    token_ids=tokens,
                    logprobs=log_probs,
                    text=completion.text,
                    finish_reason="length" if completion.finish_reason == "length" else "stop",
                )
            )
        return PromptResult(prompt_token_ids=list(output.prompt_token_ids), samples=samples)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> int:
        from safetensors.torch import save

        payload = save({k: v.contiguous() for k, v in tensors.items()})
        counts = self.llm.collective_rpc("lmmr1_load_serialized", args=(payload,))
        return int(counts[0])

    def init_nccl(self, request: NcclInitRequest) -> None:
        args = (
            request.master_address,
            request.master_port,
            request.rank_offset,
            request.world_size,
        )
        self.llm.collective_rpc("lmmr1_init_weight_sync", args=args)

    def receive_nccl(self, request: NcclUpdateRequest) -> int:
        counts = self.llm.collective_rpc(
            "lmmr1_receive_weights", args=(request.names, request.dtypes, request.shapes)
        )
        self.llm.reset_prefix_cache()
        return int(counts[0])
