"""python -m lmmr1_trainer.synthetic --task arithmetic --count 64 --seed 0 --out DIR_OR_S3_URI

Writes a synthetic dataset in the LMM-R1 row format — `train.jsonl` whose rows hold
`message` (a JSON-encoded chat list) and `answer` — plus, for image tasks, PNGs under
`images/` drawn with Pillow. Tasks:

- `arithmetic` (text, for FRE): "What is 17 + 25?" -> "42".
- `counting` (multimodal, for MGT): "How many circles are in the image?" on a picture of
  circles, squares and triangles.
- `digits` (multimodal, for MGT): "What number is written in the image?" on rendered digits.
- `mixed`: counting and digits, alternating.

Image items are `{"type": "image", "image": "file:///abs/path.png"}` for a local `--out`, and
`s3://bucket/prefix/images/….png` for an S3 `--out` (S3 endpoint from `--s3-endpoint` or
AWS_ENDPOINT_URL, credentials from AWS_*). The same seed always gives the same dataset.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmmr1_trainer.config import S3Settings
from lmmr1_trainer.storage import Storage, join_key, open_storage

Task = Literal["arithmetic", "counting", "digits", "mixed"]
DATASET_FILE = "train.jsonl"
IMAGE_SIZE = 112
# The paper's system prompt asks for the format the verifier's format reward checks.
SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the "
    "user with the answer. The reasoning process and answer are enclosed within <think> "
    "</think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think><answer> answer here </answer>"
)
_SHAPES = ("circle", "square", "triangle")
_COLOURS = ("red", "blue", "green", "black", "orange")


@dataclass(frozen=True)
class SyntheticRow:
    question: str
    answer: str
    image_png: bytes | None = None


def _arithmetic(rng: random.Random) -> SyntheticRow:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    op = rng.choice(("+", "-", "*"))
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return SyntheticRow(f"What is {a} {op} {b}?", str(value))


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _counting(rng: random.Random) -> SyntheticRow:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    draw = ImageDraw.Draw(image)
    target = rng.choice(_SHAPES)
    counts = {shape: rng.randint(0, 4) for shape in _SHAPES}
    counts[target] = max(1, counts[target])
    cells = rng.sample(range(16), sum(counts.values()))  # a 4x4 grid keeps shapes apart
    shapes = [shape for shape, n in counts.items() for _ in range(n)]
    for cell, shape in zip(cells, shapes, strict=True):
        x, y = (cell % 4) * 28 + 4, (cell // 4) * 28 + 4
        colour = rng.choice(_COLOURS)
        if shape == "circle":
            draw.ellipse((x, y, x + 20, y + 20), fill=colour)
        elif shape == "square":
            draw.rectangle((x, y, x + 20, y + 20), fill=colour)
        else:
            draw.polygon([(x + 10, y), (x, y + 20), (x + 20, y + 20)], fill=colour)
    question = f"How many {target}s are in the image?"
    return SyntheticRow(question, str(counts[target]), _png(image))


def _digits(rng: random.Random) -> SyntheticRow:
    from PIL import Image, ImageDraw, ImageFont

    number = rng.randint(0, 9999)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=28)
    draw.text((8, 40), str(number), fill="black", font=font)
    return SyntheticRow("What number is written in the image?", str(number), _png(image))


def generate_rows(task: Task, count: int, seed: int) -> list[SyntheticRow]:
    rng = random.Random(seed)
    makers = {
        "arithmetic": [_arithmetic],
        "counting": [_counting],
        "digits": [_digits],
        "mixed": [_counting, _digits],
    }[task]
    return [makers[i % len(makers)](rng) for i in range(count)]


def chat_message(question: str, image_ref: str | None) -> list[dict[str, Any]]:
    """The LMM-R1 `message`: a system prompt, then the user's image (if any) and question."""
    content: list[dict[str, str]] = []
    if image_ref is not None:
        content.append({"type": "image", "image": image_ref})
    content.append({"type": "text", "text": question})
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": content},
    ]


def write_dataset(
    task: Task, count: int, seed: int, out: str, settings: S3Settings | None = None
) -> str:
    """Write the dataset under `out` (a directory or s3:// prefix); returns the JSONL's URI."""
    storage: Storage = open_storage(out, settings)
    lines: list[str] = []
    for index, row in enumerate(generate_rows(task, count, seed)):
        image_ref = None
        if row.image_png is not None:
            key = join_key("images", f"{task}-{seed}-{index:06d}.png")
            storage.put_bytes(key, row.image_png)
            image_ref = _object_uri(storage, key)
        message = json.dumps(chat_message(row.question, image_ref))
        lines.append(json.dumps({"message": message, "answer": row.answer}))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / DATASET_FILE
        path.write_text("\n".join(lines) + "\n")
        storage.put_file(DATASET_FILE, path)
    return _object_uri(storage, DATASET_FILE)


def _object_uri(storage: Storage, key: str) -> str:
    if storage.uri.startswith("s3://"):
        return f"{storage.uri.rstrip('/')}/{key}"
    return (Path(storage.uri).resolve() / key).as_uri()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmmr1_trainer.synthetic",
        description="Write a synthetic LMM-R1 dataset (JSONL + PNGs) locally or to S3.",
    )
    parser.add_argument("--task", choices=["arithmetic", "counting", "digits", "mixed"])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="a directory or s3://bucket/prefix")
    parser.add_argument("--s3-endpoint", default=None)
    parser.add_argument("--s3-region", default=None)
    args = parser.parse_args(argv)
    if args.task is None or args.count < 1:
        parser.error("--task is required and --count must be at least 1")
    settings = S3Settings(endpoint=args.s3_endpoint, region=args.s3_region)
    uri = write_dataset(args.task, args.count, args.seed, args.out, settings)
    print(f"wrote {args.count} {args.task} rows to {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
