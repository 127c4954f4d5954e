"""bash bench/gpu.sh --phases colocate (GPU only; run by `lmmr1_bench.gpu` in its own process)

The colocated rollout path (`rollout.mode: colocate`) on Qwen2.5-VL-3B's architecture with
random weights (`load_format="dummy"`, nothing downloaded), one engine in one process:

- rollout tokens/s of `VllmEngine.generate` (colocated: sleep mode, woken for each call and
  put back to sleep after it, as the trainer does around its update; per-sample seeds,
  log-probs) as a ratio to bare `vllm.LLM.generate` on the same prompts and sampling (`n`
  samples per prompt, no per-sample seeds, no log-probs), on the same `LLM`, alternating;
- seconds per `VllmEngine.update_weights` (the policy's `state_dict()` from a random
  transformers model on the GPU, loaded in place through vLLM's `reload_weights`, caches
  reset), starting asleep as after the update.

Needs CUDA and vllm; elsewhere the phase is skipped with that reason.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from lmmr1_bench.gpu_phases import (
    BenchSettings,
    PhaseSkipped,
    Recorder,
    bench_prompts,
    importable,
    peak_memory_gib,
    random_model,
    synchronize,
)

ROUNDS = 3  # generate calls of each kind, alternating (ours, bare, ours, ...)


def phase_colocate(settings: BenchSettings, record: Recorder, deadline: float) -> None:
    if settings.device != "cuda" or not importable("vllm"):
        raise PhaseSkipped("the colocate phase needs a CUDA GPU and vllm")
    from vllm import SamplingParams as VllmSampling

    from lmmr1_trainer.rollout.backends import decode_data_images
    from lmmr1_trainer.rollout.protocol import GenerateRequest, SamplingParams
    from lmmr1_trainer.rollout.vllm_backend import VllmEngine

    started = time.monotonic()
    engine = VllmEngine(
        Path(settings.model_dir),
        gpu_memory_utilization=settings.gpu_memory_utilization,
        dtype="bfloat16",
        colocated=True,
        load_format="dummy",
    )
    record.set(engine=engine.describe(), sleep_mode=engine.sleep_mode, build_s=_since(started))
    chats = bench_prompts(settings.vllm_prompts_per_request, settings.image_side)
    # What `VllmEngine.generate` hands vLLM for each prompt: the chat-templated text and
    # the decoded image.
    bare_inputs = [
        {
            "prompt": engine.encoder.prompt_text(chat),
            "multi_modal_data": {"image": decode_data_images(chat)},
        }
        for chat in chats
    ]
    engine.generate(  # first kernels and allocations, left out
        GenerateRequest(prompts=chats[:1], sampling=SamplingParams(n=2, max_tokens=4, seed=0))
    )
    for round_ in range(ROUNDS):
        if time.monotonic() > deadline:
            break
        sampling = SamplingParams(
            n=settings.samples_per_prompt,
            max_tokens=settings.max_tokens,
            temperature=1.0,
            seed=round_,
        )
        engine.sleep()  # as after the trainer's update: the call below wakes it
        synchronize(settings.device)
        begun = time.monotonic()
        results = engine.generate(GenerateRequest(prompts=chats, sampling=sampling))
        synchronize(settings.device)
        ours_s = time.monotonic() - begun
        ours_tokens = sum(len(s.token_ids) for r in results for s in r.samples)
        bare = VllmSampling(
            n=settings.samples_per_prompt,
            max_tokens=settings.max_tokens,
            temperature=1.0,
            seed=round_,
        )
        begun = time.monotonic()
        outputs = engine.llm.generate(bare_inputs, bare, use_tqdm=False)  # type: ignore[arg-type]
        synchronize(settings.device)
        bare_s = time.monotonic() - begun
        bare_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        record.add(
            "generate",
            {
                "ours_tokens_per_s": round(ours_tokens / ours_s, 1),
                "bare_tokens_per_s": round(bare_tokens / bare_s, 1),
                "ours_s": round(ours_s, 3),
                "bare_s": round(bare_s, 3),
            },
        )
    rounds = record.data.get("generate", [])
    if rounds:
        ours = statistics.median(r["ours_tokens_per_s"] for r in rounds)
        bare = statistics.median(r["bare_tokens_per_s"] for r in rounds)
        record.set(
            ours_tokens_per_second=ours,
            bare_tokens_per_second=bare,
            tokens_per_second_ratio=round(ours / bare, 3),
        )
    _measure_updates(engine, settings, record, deadline)
    record.set(peak_memory_gib=peak_memory_gib(settings.device))


def _measure_updates(
    engine: Any, settings: BenchSettings, record: Recorder, deadline: float
) -> None:
    policy = random_model(settings, seed=2)
    last = 0.0
    for _ in range(settings.sync_repeats):
        if time.monotonic() + last * 1.5 > deadline:
            break
        engine.sleep()
        synchronize(settings.device)
        begun = time.monotonic()
        tensors = engine.update_weights(policy.state_dict().items())
        synchronize(settings.device)
        last = time.monotonic() - begun
        record.add("updates", {"seconds": round(last, 3), "tensors": tensors})
    updates = record.data.get("updates", [])
    if updates:
        record.set(median_update_s=round(statistics.median(u["seconds"] for u in updates), 3))


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)
