"""python -m lmmr1_trainer.tiny_model OUT_DIR [--text-only] [--seed 0] [--warm-start-steps 0]
    [--warm-start-task arithmetic|sokoban]

Builds a TINY, randomly initialised Qwen2.5-VL (or, with `--text-only`, a Qwen2 causal LM)
with a byte-level BPE tokenizer trained here with the `tokenizers` library, and saves it as
an HF directory (config, safetensors, tokenizer, chat template, image/video processor) that
`transformers` loads like the real Qwen2.5-VL-3B-Instruct. Nothing is downloaded.

The tokenizer has Qwen2.5-VL's special tokens (<|endoftext|>, <|im_start|>, <|im_end|>,
<|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|>) and its chatml chat template,
so prompts, the verifier's `chatml` response marker and image placeholders look exactly as
with the real model. `--warm-start-steps N` runs N SFT steps on arithmetic answers in the
`<think>…</think><answer>…</answer>` format (60% correct) so that sampled responses earn
varied rewards and RL has a signal; `--warm-start-task sokoban` trains on Sokoban frames
answered with moves instead (the shortest solution 60% of the time, random moves otherwise),
so that a Sokoban stage's samples pass the `sokoban` verifier's format now and then. Used
by the tests and the local demo.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

WarmStartTask = Literal["arithmetic", "sokoban"]
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
BPE_VOCAB_SIZE = 640
IMAGE_MIN_PIXELS = 28 * 28
IMAGE_MAX_PIXELS = 112 * 112  # at most 16 merged image tokens per image

# Qwen2.5-VL's chatml template: default system prompt, images as
# <|vision_start|><|image_pad|><|vision_end|> (the processor expands the pad per image patch).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> Iterator[str]:
    """Text the tokenizer learns from: what the synthetic tasks and the verifier's format use."""
    yield "You are a helpful assistant. system user assistant"
    yield "<think> </think> <answer> </answer> \\boxed{} \\frac{}{} $ $"
    yield "What is How many Count the circles squares triangles in the image? Read the digits."
    yield "Answer with the number. Think step by step. The answer is"
    for a in range(0, 100, 3):
        for b in range(0, 100, 7):
            yield f"What is {a} + {b}? {a} + {b} = {a + b}. {a} * {b} = {a * b}. {a} - {b}"
    yield "0123456789 + - * / = ( ) [ ] , . ? ! : ;"


def build_tokenizer() -> Any:
    """A byte-level BPE tokenizer with Qwen2.5-VL's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        model_max_length=32768,
        padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer: Any, max_pixels: int = IMAGE_MAX_PIXELS) -> Any:
    """Qwen2.5-VL's processor over `tokenizer`; images are resized to at most `max_pixels`."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=IMAGE_MIN_PIXELS, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(min_pixels=IMAGE_MIN_PIXELS, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _text_settings(tokenizer: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        # head_dim 64: vLLM's CPU attention rejects 16 ("Unsupported CPU attention
        # configuration"); 2 query heads sharing 1 KV head keep grouped-query attention.
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        "eos_token_id": tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        "pad_token_id": tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    }


def qwen25vl_config(tokenizer: Any, text: dict[str, Any], vision: dict[str, Any]) -> Any:
    """A Qwen2.5-VL config of any size whose special-token ids are those of `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


def tiny_config(tokenizer: Any, *, text_only: bool = False) -> Any:
    """The tiny model's config: Qwen2.5-VL, or (`text_only`) Qwen2."""
    from transformers import Qwen2Config

    text = _text_settings(tokenizer)
    if text_only:
        return Qwen2Config(**text)
    # mrope splits the rotary half of head_dim (64 / 2 = 32) over (time, height, width),
    # in Qwen2.5-VL's proportions ([16, 24, 24] for head_dim 128).
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [8, 12, 12]}
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": text["hidden_size"],
        "fullatt_block_indexes": [1],
        "window_size": 112,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return qwen25vl_config(tokenizer, {**text, "rope_parameters": rope}, vision)


def build_model(tokenizer: Any, *, text_only: bool = False, seed: int = 0) -> Any:
    """A randomly initialised tiny model (fp32) whose vocabulary matches `tokenizer`."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(tokenizer, text_only=text_only)
    if text_only:
        return Qwen2ForCausalLM(config)  # type: ignore[no-untyped-call]
    return Qwen2_5_VLForConditionalGeneration(config)  # type: ignore[no-untyped-call]


def _warm_start_texts(tokenizer: Any, count: int, seed: int) -> list[str]:
    """Chats answered in the verifier's format, right 60% of the time (so RL has signal)."""
    import random

    from lmmr1_trainer.synthetic import chat_message, generate_rows

    rng = random.Random(seed)
    texts = []
    for row in generate_rows("arithmetic", count, seed):
        answer = row.answer if rng.random() < 0.6 else str(int(row.answer) + rng.randint(1, 9))
        prompt = tokenizer.apply_chat_template(
            chat_message(row.question, None), tokenize=False, add_generation_prompt=True
        )
        texts.append(f"{prompt}<think>{row.question}</think><answer>{answer}</answer>{EOS_TOKEN}")
    return texts


def _image_batches(processor: Any, count: int, seed: int) -> list[Any]:
    """Counting-task chats with their images, answered in the verifier's format (60 %
    right), pre-encoded in batches of 8 for the multimodal half of the warm start."""
    import io
    import random

    from PIL import Image

    from lmmr1_trainer.synthetic import chat_message, generate_rows

    rng = random.Random(seed)
    rows = generate_rows("counting", count, seed)
    batches = []
    for start in range(0, len(rows), 8):
        texts, images = [], []
        for row in rows[start : start + 8]:
            answer = row.answer if rng.random() < 0.6 else str(int(row.answer) + 1)
            prompt = processor.apply_chat_template(
                chat_message(row.question, "image.png"),
                tokenize=False,
                add_generation_prompt=True,
            )
            texts.append(f"{prompt}<think>count</think><answer>{answer}</answer>{EOS_TOKEN}")
            assert row.image_png is not None
            images.append(Image.open(io.BytesIO(row.image_png)).convert("RGB"))
        batches.append(processor(text=texts, images=images, return_tensors="pt", padding=True))
    return batches


def _sokoban_batches(processor: Any, count: int, seed: int) -> list[Any]:
    """Sokoban chats (small frames of 1- and 2-box levels) answered with moves in the
    `sokoban` verifier's format: the shortest solution 60% of the time, else 1 to 6 random
    moves; pre-encoded in batches of 8."""
    import io
    import random

    from PIL import Image

    from lmmr1_trainer.tasks.sokoban.dataset import chat_message, generate_rows
    from lmmr1_trainer.tasks.sokoban.generate import LevelSpec

    rng = random.Random(seed)
    specs = [LevelSpec(boxes=1, max_solution_moves=8), LevelSpec(boxes=2, max_solution_moves=8)]
    rows = list(generate_rows(count, seed, specs, image_height=112))
    words = ("Left", "Right", "Up", "Down")
    batches = []
    for start in range(0, len(rows), 8):
        texts, images = [], []
        for row in rows[start : start + 8]:
            if rng.random() < 0.6:
                moves = [move.word for move in row.generated.solution]
            else:
                moves = [rng.choice(words) for _ in range(rng.randint(1, 6))]
            prompt = processor.apply_chat_template(
                chat_message("image.png"), tokenize=False, add_generation_prompt=True
            )
            answer = ", ".join(moves)
            texts.append(f"{prompt}<think>push</think><answer>{answer}</answer>{EOS_TOKEN}")
            images.append(Image.open(io.BytesIO(row.image_png)).convert("RGB"))
        batches.append(processor(text=texts, images=images, return_tensors="pt", padding=True))
    return batches


def warm_start(
    model: Any,
    tokenizer: Any,
    steps: int,
    seed: int = 0,
    processor: Any | None = None,
    task: WarmStartTask = "arithmetic",
) -> float:
    """A few SFT steps on format-following answers (the response tokens only), so that a
    tiny model's samples earn varied rewards; with a processor, every other step is on
    image prompts, so the multimodal stage has signal too (`sokoban`: every step is on
    Sokoban frames). Returns the last loss."""
    import torch

    torch.manual_seed(seed)
    if task == "sokoban":
        if processor is None:
            raise ValueError("the sokoban warm start needs the multimodal model (no --text-only)")
        sokoban = _sokoban_batches(processor, 64, seed)
        # One short answer format: 2e-3 learns it in 100 steps without garbling it.
        return _fit(model, tokenizer, steps, lambda step: sokoban[step % len(sokoban)], 2e-3)
    texts = _warm_start_texts(tokenizer, 256, seed)
    image_batches = _image_batches(processor, 64, seed) if processor is not None else []

    def batch(step: int) -> Any:
        if image_batches and step % 2:
            return image_batches[(step // 2) % len(image_batches)]
        rows = [texts[(step * 16 + i) % len(texts)] for i in range(16)]
        return tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False)

    # 1e-3 for the head_dim-64 model: well-formed answers a third of the time after 100
    # steps (measured 0.33; 2e-3 gives 0.80, 5e-3 garbles every answer).
    return _fit(model, tokenizer, steps, batch, 1e-3)


def _fit(
    model: Any, tokenizer: Any, steps: int, batch: Callable[[int], Any], learning_rate: float
) -> float:
    """`steps` AdamW steps on `batch(step)`, the loss on the response tokens only."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    marker = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        encoded = batch(step)
        labels = encoded["input_ids"].clone()
        labels[encoded["attention_mask"] == 0] = -100
        for row in range(labels.size(0)):  # learn only the answer, not the prompt
            ids = encoded["input_ids"][row].tolist()
            start = max(i for i in range(len(ids)) if ids[i : i + len(marker)] == marker)
            labels[row, : start + len(marker)] = -100
        loss = model(**encoded, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def build_tiny_model(
    out_dir: Path,
    *,
    text_only: bool = False,
    seed: int = 0,
    warm_start_steps: int = 0,
    warm_start_task: WarmStartTask = "arithmetic",
) -> Path:
    """Build and save the tiny model, tokenizer and (multimodal) processor under `out_dir`."""
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, text_only=text_only, seed=seed)
    processor = None if text_only else build_processor(tokenizer)
    if warm_start_steps:
        warm_start(model, tokenizer, warm_start_steps, seed, processor, warm_start_task)
    eos_ids = [
        tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    ]
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        do_sample=True,
        temperature=1.0,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    if processor is None:
        tokenizer.save_pretrained(out_dir)
    else:
        processor.save_pretrained(out_dir)
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmmr1_trainer.tiny_model",
        description="Build a tiny random Qwen2.5-VL (or Qwen2) with a local tokenizer.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--text-only", action="store_true", help="a Qwen2 causal LM instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--warm-start-steps",
        type=int,
        default=0,
        help="SFT steps on format-following arithmetic answers (0: purely random weights)",
    )
    parser.add_argument(
        "--warm-start-task",
        choices=["arithmetic", "sokoban"],
        default="arithmetic",
        help="what the warm start answers: arithmetic and counting, or Sokoban moves",
    )
    args = parser.parse_args(argv)
    path = build_tiny_model(
        args.out_dir,
        text_only=args.text_only,
        seed=args.seed,
        warm_start_steps=args.warm_start_steps,
        warm_start_task=args.warm_start_task,
    )
    print(f"tiny model saved to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
