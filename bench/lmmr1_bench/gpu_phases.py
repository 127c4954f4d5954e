"""The GPU benchmark's three phases, each run in its own process by `lmmr1_bench.gpu`.

- `rollout`: tokens/s of the rollout server (`RolloutServer` + `RolloutClient`, the HTTP path
  the trainer uses) over the vLLM back end when vllm imports, else the transformers one.
- `update`: seconds per optimizer step of `PolicyEngine` (DeepSpeed ZeRO, bf16, gradient
  checkpointing) on PPO-clip micro-batches built like the trainer's (`build_sequence_batch`,
  `response_log_probs`, `policy_loss`); plain torch AdamW when deepspeed is absent.
- `sync`: the full state dict from the policy to a rollout server: `gather_state_dict`
  (GPU -> CPU), `serialise`, `HttpWeightSync.push`. The NCCL path needs vLLM and two GPUs.

Every phase writes its numbers to a JSON file as it goes (`Recorder`), so a phase killed at
its time cap still leaves what it measured. Weights are random; nothing is downloaded.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import platform
import secrets
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmmr1_trainer.models import ChatEncoder, SequenceBatch
from lmmr1_trainer.rollout.backends import RolloutBackend
from lmmr1_trainer.rollout.client import RolloutClient


@dataclass(frozen=True)
class BenchSettings:
    """What one benchmark run measures; JSON round-trips between the parent and its phases."""

    tiny: bool
    device: str  # "cuda" or "cpu"
    dtype: str  # a torch dtype name: "bfloat16" or "float32"
    model_dir: str  # config, tokenizer and processor (no weights)
    rollout_backend: str  # "auto", "vllm" or "transformers"
    samples_per_prompt: int
    max_tokens: int
    image_side: int  # prompt images are resized to a square of this side
    max_requests: int
    vllm_prompts_per_request: int  # the transformers back end takes one prompt per request
    gpu_memory_utilization: float
    micro_batch: int
    seq_len: int
    accumulation: int  # micro-batches per optimizer step
    zero_stage: int
    deepspeed: bool  # False: plain torch AdamW even where deepspeed imports
    max_update_steps: int
    sync_repeats: int

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype


class PhaseSkipped(Exception):
    """A phase this machine cannot run; the message says why (e.g. a package is absent)."""


class Recorder:
    """A phase's result, rewritten atomically after every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"status": "running"}
        self._write()

    def set(self, **values: Any) -> None:
        self.data.update(values)
        self._write()

    def add(self, key: str, item: dict[str, Any]) -> None:
        self.data.setdefault(key, []).append(item)
        self._write()

    def _write(self) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.data, indent=1))
        partial.replace(self.path)


def importable(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def device_info(device: str) -> dict[str, Any]:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return {
            "name": torch.cuda.get_device_name(0),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "gpus": torch.cuda.device_count(),
        }
    return {"name": f"CPU ({platform.processor() or platform.machine()})", "cores": os.cpu_count()}


def peak_memory_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def random_model(settings: BenchSettings, seed: int) -> Any:
    """The model of `settings.model_dir`'s config with random weights, built on the device."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(settings.model_dir)
    torch.manual_seed(seed)
    with torch.device(settings.device):
        auto = AutoModelForImageTextToText
        model = auto.from_config(config, dtype=settings.torch_dtype)  # type: ignore[no-untyped-call]
    return model


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_prompts(count: int, image_side: int, seed: int = 0) -> list[list[dict[str, Any]]]:
    """LMM-R1-style counting prompts, each with one inline PNG of `image_side` pixels a side."""
    from PIL import Image

    from lmmr1_trainer.synthetic import chat_message, generate_rows

    chats = []
    for row in generate_rows("counting", count, seed):
        assert row.image_png is not None
        image = Image.open(io.BytesIO(row.image_png)).convert("RGB")
        buffer = io.BytesIO()
        image.resize((image_side, image_side), Image.Resampling.BICUBIC).save(buffer, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        chats.append(chat_message(row.question, url))
    return chats


def _time_left(deadline: float, needed_s: float) -> bool:
    return time.monotonic() + needed_s < deadline


def rollout_backend(settings: BenchSettings, seed: int) -> tuple[RolloutBackend, str]:
    """The back end the benchmark serves with, and a label that says which it is."""
    wants_vllm = settings.rollout_backend in ("auto", "vllm")
    if wants_vllm and settings.device == "cuda" and importable("vllm"):
        from importlib.metadata import version

        from lmmr1_trainer.rollout.vllm_backend import VllmBackend, VllmEngine

        engine = VllmEngine(
            Path(settings.model_dir),
            gpu_memory_utilization=settings.gpu_memory_utilization,
            load_format="dummy",
        )
        backend = VllmBackend(engine)
        return backend, f"vLLM {version('vllm')} back end (dummy random weights)"
    if settings.rollout_backend == "vllm":
        why = "no CUDA device" if settings.device != "cuda" else "vllm is not installed"
        raise PhaseSkipped(f"--rollout-backend vllm asked for, but {why}")
    from lmmr1_trainer.rollout.backends import TransformersBackend

    backend_t = TransformersBackend(Path(settings.model_dir), model=random_model(settings, seed))
    reason = "vllm is not installed" if settings.device == "cuda" else "CPU smoke test"
    return backend_t, f"transformers back end (model.generate; {reason}: NOT the vLLM figure)"


@contextmanager
def serving(backend: RolloutBackend) -> Iterator[RolloutClient]:
    """A rollout server on a free local port, in a thread, and a client for it."""
    from lmmr1_trainer.rollout.server import RolloutServer

    token = secrets.token_hex(16)
    server = RolloutServer(("127.0.0.1", 0), backend, token)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield RolloutClient([server.url], token, timeout_s=900.0, retries=1)
    finally:
        server.shutdown()
        server.server_close()


def phase_rollout(settings: BenchSettings, record: Recorder, deadline: float) -> None:
    from lmmr1_trainer.rollout.protocol import SamplingParams

    started = time.monotonic()
    backend, label = rollout_backend(settings, seed=1)
    per_request = settings.vllm_prompts_per_request if backend.name == "vllm" else 1
    record.set(backend=label, prompts_per_request=per_request, build_s=_since(started))
    prompts = bench_prompts(per_request * settings.max_requests, settings.image_side)
    with serving(backend) as client:
        warm = SamplingParams(n=2, max_tokens=4, seed=0)
        client.generate(prompts[:1], warm)  # first kernels, allocator, server threads
        sampling = SamplingParams(
            n=settings.samples_per_prompt, max_tokens=settings.max_tokens, temperature=1.0
        )
        last = 0.0
        for index in range(settings.max_requests):
            if index and not _time_left(deadline, last * 1.2):
                break
            chunk = prompts[index * per_request : (index + 1) * per_request]
            synchronize(settings.device)
            begun = time.monotonic()
            results, _ = client.generate(chunk, sampling.model_copy(update={"seed": index}))
            last = time.monotonic() - begun
            tokens = sum(len(s.token_ids) for r in results for s in r.samples)
            record.add(
                "requests",
                {
                    "prompts": len(chunk),
                    "samples": sum(len(r.samples) for r in results),
                    "prompt_tokens": len(results[0].prompt_token_ids),
                    "generated_tokens": tokens,
                    "seconds": round(last, 3),
                },
            )
    requests = record.data.get("requests", [])
    tokens = sum(r["generated_tokens"] for r in requests)
    seconds = sum(r["seconds"] for r in requests)
    record.set(
        generated_tokens=tokens,
        seconds_generating=round(seconds, 3),
        tokens_per_second=round(tokens / seconds, 1) if seconds else None,
        peak_memory_gib=peak_memory_gib(settings.device),
    )


@dataclass
class TrainingBatch:
    batch: SequenceBatch
    old_log_probs: torch.Tensor
    advantages: torch.Tensor


def training_batches(encoder: ChatEncoder, settings: BenchSettings) -> list[SequenceBatch]:
    """`accumulation` micro-batches of `micro_batch` image prompts + random responses that
    fill `seq_len` tokens, padded as the trainer pads them."""
    from lmmr1_trainer.models import build_sequence_batch
    from lmmr1_trainer.rollout.backends import decode_data_images

    forbidden = set(encoder.vision_token_ids) | set(encoder.eos_token_ids)
    allowed = torch.tensor([i for i in range(len(encoder.tokenizer)) if i not in forbidden])
    generator = torch.Generator().manual_seed(0)
    count = settings.micro_batch * settings.accumulation
    chats = bench_prompts(count, settings.image_side, seed=1)
    prompts = [encoder.encode(chat, decode_data_images(chat)) for chat in chats]
    batches = []
    for start in range(0, count, settings.micro_batch):
        chunk = prompts[start : start + settings.micro_batch]
        responses = []
        for prompt in chunk:
            length = settings.seq_len - int(prompt["input_ids"].shape[-1])
            if length < 1:
                raise ValueError(f"--seq-len {settings.seq_len} leaves no room for a response")
            picks = torch.randint(len(allowed), (length,), generator=generator)
            responses.append(allowed[picks].tolist())
        batches.append(
            build_sequence_batch(chunk, responses, encoder.pad_token_id, encoder.image_token_id)
        )
    return batches


class PlainTorchUpdater:
    """Without DeepSpeed: torch AdamW on the model's own weights (bf16 on GPU: no fp32 master
    copy, no ZeRO), the same accumulation and clipping. Mirrors `PolicyEngine`'s interface."""

    def __init__(self, model: Any, accumulation: int, on_gpu: bool) -> None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        self.engine = model
        self.accumulation = accumulation
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0, fused=on_gpu
        )
        self._micro_batches = 0

    def backward_and_step(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()  # type: ignore[no-untyped-call]
        self._micro_batches += 1
        if self._micro_batches % self.accumulation == 0:
            torch.nn.utils.clip_grad_norm_(self.engine.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


# Bytes per parameter on one GPU with DeepSpeed ZeRO and bf16, where nothing is partitioned:
# bf16 weights and gradients (2 + 2), fp32 master weights, gradients and two Adam moments
# (4 x 4), and foreach AdamW's fp32 temporary at the step (4). 3.75 B parameters: ~84 GiB.
DEEPSPEED_BYTES_PER_PARAMETER = 24


def _updater(settings: BenchSettings, record: Recorder) -> Any:
    on_gpu = settings.device == "cuda"
    model = random_model(settings, seed=2)
    parameters = parameter_count(model)
    record.set(parameters=parameters)
    if not settings.deepspeed or not importable("deepspeed"):
        why = "--no-deepspeed" if not settings.deepspeed else "deepspeed is not installed"
        record.set(engine=f"plain torch AdamW ({why}; {settings.dtype} weights, no ZeRO)")
        return PlainTorchUpdater(model, settings.accumulation, on_gpu)
    from importlib.metadata import version

    from lmmr1_trainer.config import AlgorithmConfig
    from lmmr1_trainer.engine import PolicyEngine, setup_distributed

    if on_gpu:
        need = parameters * DEEPSPEED_BYTES_PER_PARAMETER / 2**30
        record.set(zero_state_gib=round(need, 1))
    setup_distributed(on_gpu)
    samples = settings.micro_batch * settings.accumulation
    algo = AlgorithmConfig(
        samples_per_prompt=1,
        rollout_batch_size=samples,
        train_batch_size=samples,
        micro_train_batch_size=settings.micro_batch,
        learning_rate=1e-6,
        zero_stage=settings.zero_stage,  # type: ignore[arg-type]
        bf16=on_gpu,
        gradient_checkpointing=True,
    )
    policy = PolicyEngine(model, algo, 1, settings.max_update_steps + 1, on_gpu)
    precision = "bf16" if on_gpu else "fp32"
    record.set(
        engine=f"DeepSpeed {version('deepspeed')} ZeRO-{policy.zero_stage}, {precision}, "
        "gradient checkpointing, torch AdamW"
    )
    return policy


def phase_update(settings: BenchSettings, record: Recorder, deadline: float) -> None:
    from lmmr1_trainer.algorithms import policy_loss
    from lmmr1_trainer.models import response_log_probs

    started = time.monotonic()
    encoder = ChatEncoder.load(Path(settings.model_dir))
    updater = _updater(settings, record)
    model = updater.engine
    record.set(
        micro_batch=settings.micro_batch,
        seq_len=settings.seq_len,
        accumulation=settings.accumulation,
        init_s=_since(started),
    )
    device = next(model.parameters()).device
    prepared = []
    for batch in training_batches(encoder, settings):
        synchronize(settings.device)
        begun = time.monotonic()
        with torch.no_grad():  # the trainer's old-log-prob pass (prepare_micro_batches)
            old = response_log_probs(model, batch).detach()
        synchronize(settings.device)
        record.add("logprob_pass_s", {"seconds": _since(begun)})
        mask = batch.response_mask.to(device)
        prepared.append(TrainingBatch(batch, old, torch.randn(mask.shape, device=device) * mask))
    tokens = sum(int(t.batch.attention_mask.sum()) for t in prepared)
    record.set(tokens_per_step=tokens)
    model.train()
    last = 0.0
    for step in range(settings.max_update_steps + 1):  # step 0 warms up
        if step > 1 and not _time_left(deadline, last * 1.3):
            break
        synchronize(settings.device)
        begun = time.monotonic()
        for item in prepared:
            mask = item.batch.response_mask.to(device)
            log_probs = response_log_probs(model, item.batch)
            loss, _ = policy_loss(log_probs, item.old_log_probs, item.advantages, mask, 0.2)
            updater.backward_and_step(loss)
        synchronize(settings.device)
        last = time.monotonic() - begun
        record.add("steps", {"seconds": round(last, 4), "warm_up": step == 0})
    measured = [s["seconds"] for s in record.data["steps"] if not s["warm_up"]]
    median = statistics.median(measured) if measured else None
    passes = [p["seconds"] for p in record.data["logprob_pass_s"]]
    record.set(
        median_logprob_pass_s=round(statistics.median(passes), 4),
        median_step_s=round(median, 4) if median else None,
        train_tokens_per_second=round(tokens / median, 1) if median else None,
        peak_memory_gib=peak_memory_gib(settings.device),
    )


def phase_sync(settings: BenchSettings, record: Recorder, deadline: float) -> None:
    from lmmr1_trainer.engine import gather_state_dict
    from lmmr1_trainer.weight_sync import HttpWeightSync, serialise

    started = time.monotonic()
    backend, label = rollout_backend(settings, seed=1)
    policy = random_model(settings, seed=2)
    sizes = [t.numel() * t.element_size() for t in policy.state_dict().values()]
    record.set(
        receiver=label,
        tensors=len(sizes),
        state_dict_gib=round(sum(sizes) / 2**30, 3),
        build_s=_since(started),
    )
    with serving(backend) as client:
        sync = HttpWeightSync(client)
        state: dict[str, torch.Tensor] = {}
        last = 0.0
        for version in range(1, settings.sync_repeats + 1):
            if version > 1 and not _time_left(deadline, last * 2):  # then serialise alone
                break
            synchronize(settings.device)
            begun = time.monotonic()
            state = gather_state_dict(policy)  # what PolicyEngine.full_state_dict does (ZeRO-2)
            gathered = time.monotonic()
            sync.push(state, version)
            last = time.monotonic() - begun
            push_s = round(time.monotonic() - gathered, 3)
            record.add("pushes", {"gather_s": round(gathered - begun, 3), "push_s": push_s})
        begun = time.monotonic()
        payload_bytes = len(serialise(state))
        record.set(serialise_s=_since(begun), payload_gib=round(payload_bytes / 2**30, 3))
        record.set(verified=_received(backend, state))
        pushes = record.data["pushes"]
        record.set(
            median_gather_s=round(statistics.median(p["gather_s"] for p in pushes), 3),
            median_push_s=round(statistics.median(p["push_s"] for p in pushes), 3),
            peak_memory_gib=peak_memory_gib(settings.device),
        )
        _nccl_pushes(backend, client, state, record, deadline)


def _received(backend: RolloutBackend, state: dict[str, torch.Tensor]) -> bool | None:
    """Whether the server now holds the pushed weights (a few tensors, transformers back end)."""
    model = getattr(backend, "model", None)
    if model is None:
        return None
    served = model.state_dict()
    names = list(state)
    sample = {names[0], names[len(names) // 2], names[-1]}
    return all(torch.equal(served[name].cpu(), state[name]) for name in sample)


def _nccl_pushes(
    backend: RolloutBackend,
    client: RolloutClient,
    state: dict[str, torch.Tensor],
    record: Recorder,
    deadline: float,
) -> None:
    """`NcclWeightSync` from a second GPU to the vLLM server (UNTESTED: needs vLLM and two
    GPUs; NCCL refuses two ranks on one device, so a single-GPU machine cannot measure it)."""
    if backend.name != "vllm":
        record.set(nccl="not measured: needs the vLLM back end (vllm is not installed here)")
        return
    if torch.cuda.device_count() < 2:
        record.set(nccl="not measured: needs two GPUs (NCCL refuses two ranks on one device)")
        return
    from lmmr1_trainer.weight_sync import NcclWeightSync

    torch.cuda.set_device(1)  # the trainer's rank; vLLM's worker holds GPU 0
    begun = time.monotonic()
    nccl = NcclWeightSync(client, tensor_parallel_size=1)
    record.set(nccl="measured", nccl_init_s=_since(begun))
    last = 0.0
    for version in range(100, 103):
        if version > 100 and not _time_left(deadline, last * 1.3):
            break
        begun = time.monotonic()
        nccl.push(state, version)
        last = time.monotonic() - begun
        record.add("nccl_pushes", {"push_s": round(last, 3)})


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)


PhaseFunction = Callable[[BenchSettings, Recorder, float], None]
PHASES: dict[str, PhaseFunction] = {
    "rollout": phase_rollout,
    "update": phase_update,
    "sync": phase_sync,
}
