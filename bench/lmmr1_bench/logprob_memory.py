"""python -m lmmr1_bench.logprob_memory [--lengths 256,512,1024,2048,4096] [--vocab 151936]
[--micro-batch 1] [--dtype float32]

Peak CPU memory of the trainer's log-prob pass against sequence length (issue 13): the plain
computation the trainer used before (`full_logits_log_probs`: the logits of every position,
then an fp32 log-softmax, then the response positions picked out) against
`lmmr1_trainer.models.response_log_probs` (only response positions, through the LM head a
chunk at a time, each chunk checkpointed under autograd). Two modes: `forward` (no autograd:
the old/reference log-prob pass) and `forward+backward` (the update: a loss on the log-probs,
backward, with gradient checkpointing on as the trainer's engine sets it).

The model is the tiny Qwen2.5-VL of `lmmr1_trainer.tiny_model` (hidden 128, 2 layers) with
Qwen2.5-VL's vocabulary size (151,936 by default): the logits are almost all of the memory,
as they are at 3B. fp32 by default: bf16 matmuls are about 30x slower on a CPU without
AVX512-BF16 (`--dtype bfloat16` gave the same peaks at 512 tokens). Each sequence is an
image prompt padded with text tokens to half of `length`, then `length / 2` response tokens.

Each measurement runs in a fresh process (`--one METHOD MODE LENGTH`): it builds the model
and the batch, runs the pass once on a short batch (to load kernels), resets the kernel's
peak-RSS mark (`echo 5 > /proc/self/clear_refs`), runs the pass, and reports peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) minus the RSS just before the pass. Prints a
markdown table; docs/benchmarks.md holds one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lmmr1_trainer.algorithms import token_log_probs
from lmmr1_trainer.machine import cpu_model, load_average
from lmmr1_trainer.models import (
    LOG_PROB_CHUNK_TOKENS,
    ChatEncoder,
    SequenceBatch,
    build_sequence_batch,
    response_log_probs,
)

METHODS = ("full-logits", "chunked")
MODES = ("forward", "forward+backward")
QWEN25VL_VOCAB = 151_936
WARM_UP_LENGTH = 128


def full_logits_log_probs(model: Any, batch: SequenceBatch, temperature: float = 1.0) -> Tensor:
    """The trainer's log-prob pass before issue 13, as it was: logits (B, L, V) of every
    position, fp32 log-softmax over all of them, then each response position gathered."""
    kwargs: dict[str, Tensor] = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
    }
    if batch.pixel_values is not None and batch.image_grid_thw is not None:
        kwargs["pixel_values"] = batch.pixel_values
        kwargs["image_grid_thw"] = batch.image_grid_thw
    if batch.mm_token_type_ids is not None:
        kwargs["mm_token_type_ids"] = batch.mm_token_type_ids
    logits = model(**kwargs, use_cache=False).logits
    full = token_log_probs(logits[:, :-1], kwargs["input_ids"][:, 1:], temperature)  # (B, L-1)
    steps = torch.arange(batch.response_mask.size(1))
    index = (batch.prompt_lengths.unsqueeze(1) - 1 + steps).clamp(max=full.size(1) - 1)
    return full.gather(1, index) * batch.response_mask


def _model_and_encoder(vocab: int, dtype: torch.dtype) -> tuple[Any, ChatEncoder]:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lmmr1_trainer.tiny_model import build_processor, build_tokenizer, tiny_config

    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer)
    config.text_config.vocab_size = vocab
    torch.manual_seed(0)
    model: Any = Qwen2_5_VLForConditionalGeneration(config)  # type: ignore[no-untyped-call]
    model.to(dtype)
    image_token_id = int(tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    return model, ChatEncoder(tokenizer, build_processor(tokenizer), image_token_id)


def _batch(encoder: ChatEncoder, length: int, micro_batch: int, vocab: int) -> SequenceBatch:
    """`micro_batch` copies of one sequence: an image prompt padded with text to length / 2,
    then length / 2 response tokens (none of them a vision placeholder)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(length)
    pixels = torch.randint(0, 256, (56, 56, 3), generator=generator, dtype=torch.uint8)
    content = [{"type": "image", "image": "file:///x.png"}, {"type": "text", "text": "How many?"}]
    prompt = encoder.encode(
        [{"role": "user", "content": content}], [Image.fromarray(pixels.numpy())]
    )
    ordinary = max(encoder.vision_token_ids) + 1
    ids = prompt["input_ids"]
    padding = torch.randint(ordinary, 640, (1, length // 2 - ids.size(1)), generator=generator)
    prompt["input_ids"] = torch.cat([ids, padding], dim=1)
    response = torch.randint(ordinary, vocab, (length - length // 2,), generator=generator)
    return build_sequence_batch(
        [prompt] * micro_batch,
        [response.tolist()] * micro_batch,
        encoder.pad_token_id,
        encoder.image_token_id,
    )


def _log_prob_pass(method: str, mode: str, model: Any, batch: SequenceBatch) -> None:
    compute = full_logits_log_probs if method == "full-logits" else response_log_probs
    if mode == "forward":
        with torch.no_grad():
            compute(model, batch)
        return
    log_probs = compute(model, batch)
    (log_probs * batch.response_mask).sum().backward()  # type: ignore[no-untyped-call]
    model.zero_grad(set_to_none=True)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_one(
    method: str, mode: str, length: int, micro_batch: int, vocab: int, dtype: torch.dtype
) -> dict[str, Any]:
    """In this process: peak RSS of one pass above the RSS just before it."""
    torch.set_num_threads(2)
    model, encoder = _model_and_encoder(vocab, dtype)
    if mode == "forward":
        model.eval()
    else:  # as the trainer's engine sets the policy up
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    batch = _batch(encoder, length, micro_batch, vocab)
    _log_prob_pass(method, mode, model, _batch(encoder, WARM_UP_LENGTH, 1, vocab))
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # peak RSS := current RSS
    before = _rss_bytes()
    started = time.monotonic()
    _log_prob_pass(method, mode, model, batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "method": method,
        "mode": mode,
        "length": length,
        "response_tokens": int(batch.response_mask.sum()),
        "peak_mib": round((peak - before) / 2**20, 1),
        "seconds": round(time.monotonic() - started, 2),
    }


def _run_one(method: str, mode: str, length: int, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "lmmr1_bench.logprob_memory", "--one", method, mode]
    command += [str(length), f"--micro-batch={args.micro_batch}", f"--vocab={args.vocab}"]
    command += [f"--dtype={args.dtype}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {"method": method, "mode": mode, "length": length, "failed": reason[:120]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _cell(result: dict[str, Any]) -> str:
    if "failed" in result:
        return f"failed: {result['failed']}"
    return f"{result['peak_mib']:,.0f} ({result['seconds']:.1f} s)"


def render(results: list[dict[str, Any]], args: argparse.Namespace, lengths: list[int]) -> str:
    by_key = {(r["method"], r["mode"], r["length"]): r for r in results}
    header = "| tokens (prompt + response) | logits of the sequence, fp32 |"
    header += "".join(f" {method} {mode} |" for mode in MODES for method in METHODS)
    lines = [header, "|---:|---:|" + "---:|" * 4]
    for length in lengths:
        logits_mib = args.micro_batch * (length - 1) * args.vocab * 4 / 2**20
        cells = [_cell(by_key[(method, mode, length)]) for mode in MODES for method in METHODS]
        prompt = length // 2
        row = f"| {length} ({prompt} + {length - prompt}) | {logits_mib:,.0f} | "
        lines.append(row + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    with open("/proc/meminfo") as meminfo:
        total_kib = int(meminfo.readline().split()[1])
    return (
        f"{os.cpu_count()} cores ({cpu_model()}), {total_kib / 2**20:.0f} GiB, "
        f"{platform.platform()}; torch {torch.__version__}; load average {load_average()}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lengths", default="256,512,1024,2048,4096")
    parser.add_argument("--vocab", type=int, default=QWEN25VL_VOCAB)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "MODE", "LENGTH"))
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.one:
        method, mode, length = args.one
        if method not in METHODS or mode not in MODES:
            parser.error(f"--one: METHOD in {METHODS}, MODE in {MODES}")
        result = measure_one(method, mode, int(length), args.micro_batch, args.vocab, dtype)
        print(json.dumps(result))
        return 0
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"Machine: {machine()}", flush=True)
    started = time.monotonic()
    results = []
    for length in lengths:
        for mode in MODES:
            for method in METHODS:
                results.append(_run_one(method, mode, length, args))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(
        f"\nmicro-batch {args.micro_batch}, vocabulary {args.vocab}, {args.dtype} weights, "
        f"chunks of {LOG_PROB_CHUNK_TOKENS} tokens; peak RSS above the RSS before the pass, "
        f"MiB (seconds of the pass); {time.monotonic() - started:.0f} s in all, load average "
        f"{load_average()} at the end.\n"
    )
    print(render(results, args, lengths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
