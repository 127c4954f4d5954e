"""Rollout back ends: the interface, and the transformers one (CPU, tests, the local demo).

The vLLM back end (GPU) lives in `vllm_backend.py` and is imported only when chosen.
"""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path
from typing import Any, Protocol

import torch

from lmmr1_trainer.algorithms import token_log_probs
from lmmr1_trainer.data import ChatMessage, image_refs
from lmmr1_trainer.models import ChatEncoder, load_model
from lmmr1_trainer.rollout.protocol import (
    GenerateRequest,
    NcclInitRequest,
    NcclUpdateRequest,
    PromptResult,
    Sample,
)


class BackendUnavailable(RuntimeError):
    """A back end or feature this machine cannot run (e.g. vLLM or NCCL without a GPU)."""


class RolloutBackend(Protocol):
    name: str

    def generate(self, request: GenerateRequest) -> list[PromptResult]: ...
    def load_weights(self, tensors: dict[str, torch.Tensor]) -> int: ...
    def init_nccl(self, request: NcclInitRequest) -> None: ...
    def receive_nccl(self, request: NcclUpdateRequest) -> int: ...


def decode_data_images(messages: list[ChatMessage]) -> list[Any]:
    """PIL images of a chat whose images are inline `data:` URLs (as the client sends them)."""
    from PIL import Image

    images = []
    for ref in image_refs(messages):
        if not ref.startswith("data:"):
            raise ValueError(f"images must be sent inline as data: URLs, got {ref[:40]!r}")
        raw = base64.b64decode(ref.split(",", 1)[1])
        images.append(Image.open(io.BytesIO(raw)).convert("RGB"))
    return images


class TransformersBackend:
    """`model.generate` on CPU (or one GPU); one request at a time, weights swapped in place.

    `model`: an already built model (on any device) instead of the weights in `model_dir`,
    whose tokenizer and processor are still used (the GPU benchmark's random weights).
    """

    name = "transformers"

    def __init__(self, model_dir: Path, threads: int | None = None, model: Any = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.encoder = ChatEncoder.load(model_dir)
        self.model = (model if model is not None else load_model(model_dir)).eval()
        self.device = next(self.model.parameters()).device
        self._lock = threading.Lock()

    def generate(self, request: GenerateRequest) -> list[PromptResult]:
        with self._lock, torch.no_grad():
            if request.sampling.seed is not None:
                torch.manual_seed(request.sampling.seed)
            return [self._one(chat, request) for chat in request.prompts]

    def _one(self, chat: list[ChatMessage], request: GenerateRequest) -> PromptResult:
        sampling = request.sampling
        inputs = self.encoder.encode(chat, decode_data_images(chat))
        image_token = self.encoder.image_token_id
        if "image_grid_thw" in inputs and image_token is not None:
            inputs["mm_token_type_ids"] = inputs["input_ids"].eq(image_token).int()
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        prompt_len = int(inputs["input_ids"].shape[1])
        greedy = sampling.temperature == 0.0
        out = self.model.generate(
            **inputs,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            max_new_tokens=sampling.max_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=self.encoder.eos_token_ids,
            suppress_tokens=self.encoder.vision_token_ids or None,
            pad_token_id=self.encoder.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        generated = out.sequences[:, prompt_len:]
        logits = torch.stack(out.logits, dim=1)  # (n, steps, V), raw (before sampling)
        log_probs = token_log_probs(logits, generated, max(sampling.temperature, 1e-6))
        stops = set(self.encoder.eos_token_ids)
        samples = []
        for row, row_log_probs in zip(generated.tolist(), log_probs.tolist(), strict=True):
            end = next((i + 1 for i, token in enumerate(row) if token in stops), None)
            tokens = row[:end] if end is not None else row
            samples.append(
                Sample(
                    token_ids=tokens,
                    logprobs=row_log_probs[: len(tokens)],
                    text=self.encoder.decode(tokens),
                    finish_reason="stop" if end is not None else "length",
                )
            )
        return PromptResult(prompt_token_ids=inputs["input_ids"][0].tolist(), samples=samples)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> int:
        with self._lock, torch.no_grad():
            missing, unexpected = self.model.load_state_dict(tensors, strict=False)
            tied = (
                {"lm_head.weight"}
                if self.model.config.get_text_config().tie_word_embeddings
                else set()
            )
            if unexpected or set(missing) - tied:
                raise ValueError(
                    f"weights do not match the model: missing {sorted(missing)[:5]}, "
                    f"unexpected {sorted(unexpected)[:5]}"
                )
            return len(tensors)

    def init_nccl(self, request: NcclInitRequest) -> None:
        raise BackendUnavailable(
            "NCCL weight sync needs the vllm back end on a GPU; the transformers back end "
            "takes weights over HTTP (POST /update_weights)"
        )

    def receive_nccl(self, request: NcclUpdateRequest) -> int:
        raise BackendUnavailable(
            "NCCL weight sync needs the vllm back end on a GPU (POST /update_weights instead)"
        )
