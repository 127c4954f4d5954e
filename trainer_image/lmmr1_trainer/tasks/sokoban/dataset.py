"""Sokoban rows in the project's dataset format, with the prompt of LMM-R1's Sokoban data.

Each row of `train.jsonl`: `message`, a JSON-encoded chat (the reference's system prompt,
then the level's image and the reference's answer instructions); `answer`, the label: the
level in XSB text (`level.py`), which the `sokoban` verifier replays answers in; `question`,
a level id (the reference's rows carry one too); `solution_length`, the fewest moves that
solve it. Images are `images/<id>.png`, referenced relatively, so they resolve against the
dataset file's folder (or `dataset.imageRoot`) wherever the folder is copied.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmmr1_trainer.config import S3Settings
from lmmr1_trainer.storage import Storage, join_key, open_storage
from lmmr1_trainer.tasks.sokoban.generate import GeneratedLevel, LevelSpec, generate_level
from lmmr1_trainer.tasks.sokoban.render import render_png

DATASET_FILE = "train.jsonl"
IMAGE_DIR = "images"
# The reference's wording (examples/scripts/lmm_r1/train_sokoban.sh), kept as the policy
# was trained with it; the answer format it asks for is what the verifier checks.
SYSTEM_PROMPT = (
    "You're going to play a game of Sokoban, where the goal is to manipulate the green "
    "character to push the yellow box into the target area (an area with a red dot in the "
    "center). \nGenerate all actions from the initial frame to the end at once."
)
INSTRUCTION = (
    "You should first thinks about the reasoning process in the mind and then provides the "
    "user with the answer, the answer is a long sequence of Left, Right, Up, Down, separated "
    "by ','. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, e.g., <think> To ... </think><answer> Left, "
    "Right, ... </answer>, which means your output should start with <think> and end with "
    "</answer>."
)


@dataclass(frozen=True)
class SokobanRow:
    level_id: str
    generated: GeneratedLevel
    image_png: bytes

    @property
    def image_key(self) -> str:
        return join_key(IMAGE_DIR, f"{self.level_id}.png")


def chat_message(image_ref: str) -> list[dict[str, Any]]:
    """The reference's chat: the system prompt, then the frame and the instructions."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image_ref},
                {"type": "text", "text": INSTRUCTION},
            ],
        },
    ]


def generate_rows(
    count: int, seed: int, specs: Sequence[LevelSpec], image_height: int
) -> Iterator[SokobanRow]:
    """`count` levels, row i made by `specs[i % len(specs)]`, from one seeded generator;
    frames `image_height` pixels high at most (whole pixels a cell)."""
    rng = random.Random(seed)
    for index in range(count):
        spec = specs[index % len(specs)]
        generated = generate_level(rng, spec)
        tile = max(4, image_height // spec.height)
        level_id = f"sokoban-{spec.height}x{spec.width}-{spec.boxes}b-s{seed}-{index:06d}"
        yield SokobanRow(level_id, generated, render_png(generated.level, tile))


def row_json(row: SokobanRow) -> dict[str, Any]:
    return {
        "message": json.dumps(chat_message(row.image_key)),
        "answer": row.generated.level.to_text(),
        "question": row.level_id,
        "solution_length": len(row.generated.solution),
    }


def write_dataset(
    out: str,
    count: int,
    seed: int,
    specs: Sequence[LevelSpec],
    image_height: int,
    settings: S3Settings | None = None,
) -> str:
    """Images and `train.jsonl` under `out` (a directory or s3:// prefix); the JSONL's URI."""
    storage: Storage = open_storage(out, settings)
    lines = []
    for row in generate_rows(count, seed, specs, image_height):
        storage.put_bytes(row.image_key, row.image_png)
        lines.append(json.dumps(row_json(row)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / DATASET_FILE
        path.write_text("\n".join(lines) + "\n")
        storage.put_file(DATASET_FILE, path)
    if storage.uri.startswith("s3://"):
        return f"{storage.uri.rstrip('/')}/{DATASET_FILE}"
    return (Path(storage.uri).resolve() / DATASET_FILE).as_uri()
