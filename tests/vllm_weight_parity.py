"""python tests/vllm_weight_parity.py MODEL_DIR IMAGE_DATASET OUT.json [--server URL --token-file F]

The weight-update parity check behind tests/integration/test_vllm_weights.py, in its own
process (a colocated vLLM engine lives in its caller's process, as in a trainer rank):

1. vLLM generates for a text prompt and an image prompt; the trainer's forward pass
   (`response_log_probs`, as the trainer computes old log-probs) on the same tokens must
   give the same log-probs;
2. the weights change as an update would change them, and are handed to vLLM the product's
   way: colocated, `VllmEngine.update_weights` with the policy's own tensors; with
   `--server`, `HttpWeightSync.push` to a running rollout server;
3. vLLM generates again; its log-probs must equal the forward pass with the *new* weights,
   and differ from the forward pass with the old ones.

Writes the largest differences to OUT.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from lmmr1_trainer.config import DatasetConfig
from lmmr1_trainer.data import ImageLoader, decode_images, load_dataset
from lmmr1_trainer.models import (
    ChatEncoder,
    build_sequence_batch,
    load_model,
    response_log_probs,
)
from lmmr1_trainer.rollout.protocol import GenerateRequest, PromptResult, SamplingParams
from lmmr1_trainer.synthetic import chat_message

SAMPLING = SamplingParams(n=3, max_tokens=8, seed=11)


def _largest_gap(
    model: Any,
    encoder: ChatEncoder,
    chats: list[list[dict[str, Any]]],
    results: list[PromptResult],
    loader: ImageLoader,
) -> float:
    """The largest |vLLM log-prob - trainer log-prob| over every generated token."""
    worst = 0.0
    for chat, result in zip(chats, results, strict=True):
        encoded = encoder.encode(chat, decode_images(chat, loader))
        assert encoded["input_ids"][0].tolist() == result.prompt_token_ids
        batch = build_sequence_batch(
            [encoded] * len(result.samples),
            [s.token_ids for s in result.samples],
            encoder.pad_token_id,
            encoder.image_token_id,
        )
        with torch.no_grad():
            trainer = response_log_probs(model, batch)
        for row, sample in enumerate(result.samples):
            n = len(sample.token_ids)
            gap = (trainer[row, :n] - torch.tensor(sample.logprobs)).abs().max().item()
            worst = max(worst, gap)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("images", type=Path, help="a multimodal dataset (jsonl)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--server", default=None)
    parser.add_argument("--token-file", type=Path, default=None)
    args = parser.parse_args()

    loader = ImageLoader()
    image_chat = load_dataset(DatasetConfig(uri=str(args.images), type="multimodal"))[0].messages
    chats = [chat_message("What is 12 + 30?", None), image_chat]
    inline = [loader.inline(chat) for chat in chats]
    encoder = ChatEncoder.load(args.model)
    policy = load_model(args.model).eval()

    if args.server:
        from lmmr1_trainer.rollout.client import RolloutClient
        from lmmr1_trainer.weight_sync import HttpWeightSync

        assert args.token_file is not None
        client = RolloutClient([args.server], args.token_file.read_text().strip())
        client.wait_ready()

        def generate() -> list[PromptResult]:
            return client.generate(inline, SAMPLING)[0]

        def push(state: dict[str, torch.Tensor]) -> None:
            HttpWeightSync(client).push(state, version=1)
    else:
        from lmmr1_trainer.rollout.vllm_backend import VllmEngine

        engine = VllmEngine(args.model, colocated=True, dtype="float32", max_model_len=2048)

        def generate() -> list[PromptResult]:
            return engine.generate(GenerateRequest(prompts=inline, sampling=SAMPLING))

        def push(state: dict[str, torch.Tensor]) -> None:
            engine.update_weights(state.items())

    before = generate()
    report = {"before": _largest_gap(policy, encoder, chats, before, loader)}
    # A step bigger than one engine step's token budget (48 seeded samples of a 252-token
    # image prompt): on CPU a prefill split over two engine steps failed every seeded sample.
    if not args.server:
        many = engine.generate(GenerateRequest(prompts=[inline[1]] * 16, sampling=SAMPLING))
        report["big_step_samples"] = sum(len(r.samples) for r in many)
    old = load_model(args.model).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.05 * torch.randn_like(param))
    push(policy.state_dict())
    after = generate()
    report["after"] = _largest_gap(policy, encoder, chats, after, loader)
    report["after_vs_old_weights"] = _largest_gap(old, encoder, chats, after, loader)
    report["tokens"] = sum(len(s.token_ids) for r in after for s in r.samples)
    report["image_prompt_tokens"] = len(after[1].prompt_token_ids)
    args.out.write_text(json.dumps(report))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
