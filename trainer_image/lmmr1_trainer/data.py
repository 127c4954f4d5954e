"""The LMM-R1 dataset: rows, images, and a seeded shuffle with a resumable position.

A row is a JSON object with `message` (a JSON-encoded chat list, or the list itself) and
`answer` (key names from the stage's `DatasetConfig`). Images inside the chat are
`{"type": "image", "image": "file://…" | "s3://…" | "pvc://claim/…" | "data:…" | "img/a.png"}`;
a relative path (`img/a.png` or `file://img/a.png`) is resolved against `dataset.image_root`
(`s3://bucket/prefix` or `pvc://claim/dir`, which the operator mounts), else the dataset
file's own folder. Absolute paths are kept as they are (`lmmr1_trainer.preflight` names the
rows whose images are missing before the first step).
Before a prompt goes to a rollout server its images are inlined as data URLs: the rollout
pods cannot read the trainer's files.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import random
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from lmmr1_trainer.config import DatasetConfig, S3Settings
from lmmr1_trainer.storage import Storage, local_path, open_storage

ChatMessage = dict[str, Any]


class DatasetError(ValueError):
    """A dataset that cannot be read or has a malformed row; the message names the row."""


class ImageMissing(DatasetError):
    """A local image (file://, pvc:// or a path) that is not there."""


@dataclass(frozen=True)
class PromptRow:
    index: int
    messages: list[ChatMessage]
    label: str
    where: str = ""  # "train.jsonl:12": the file and line it came from, for reports


@dataclass(frozen=True)
class RowProblem:
    """Why one row cannot be trained on: where it is, which field, what is wrong."""

    where: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where} {self.field}: {self.reason}"


def _parent_uri(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def _read_text(uri: str, settings: S3Settings | None) -> list[tuple[str, str, str]]:
    """(source uri, name for reports, text) for one JSONL file, or every *.jsonl under a
    directory/prefix."""
    if uri.endswith((".jsonl", ".json")):
        parent, _, name = uri.rpartition("/")
        return [(uri, name, open_storage(parent, settings).get_bytes(name).decode())]
    storage = open_storage(uri, settings)
    found = [o.key for o in storage.list("") if o.key.endswith(".jsonl")]
    if not found:
        raise DatasetError(f"{uri}: no .jsonl files")
    return [(f"{uri.rstrip('/')}/{key}", key, storage.get_bytes(key).decode()) for key in found]


def _chat_problem(message: Any) -> str | None:
    """What is wrong with a parsed `message`, or None for a chat list of role/content turns
    whose image items carry an `image` reference."""
    if not isinstance(message, list) or not message:
        return f"must be a non-empty chat list, got {type(message).__name__}"
    for turn, item in enumerate(message):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            return f"turn {turn} must be an object with 'role' and 'content'"
        content = item["content"]
        if isinstance(content, list):
            for part in content:
                is_image = isinstance(part, dict) and part.get("type") == "image"
                if is_image and not (isinstance(part.get("image"), str) and part["image"]):
                    return f"turn {turn} has an image item without an 'image' reference"
    return None


def parse_row(
    raw: Any, index: int, config: DatasetConfig, where: str = ""
) -> PromptRow | RowProblem:
    """One JSONL object as a row, or the problem that stops it being one. A string `message`
    must be a JSON-encoded chat list: a plain question is an error, not a one-turn chat,
    because a malformed JSON chat would otherwise train as its own source text."""
    where = where or f"row {index}"
    if not isinstance(raw, dict):
        return RowProblem(where, "line", f"must be a JSON object, got {type(raw).__name__}")
    if config.prompt_key not in raw:
        return RowProblem(where, config.prompt_key, f"missing (the row has {sorted(raw)})")
    if raw.get(config.label_key) is None:
        return RowProblem(where, config.label_key, f"missing (the row has {sorted(raw)})")
    message = raw[config.prompt_key]
    if isinstance(message, str):
        try:
            message = json.loads(message)
        except json.JSONDecodeError as err:
            return RowProblem(where, config.prompt_key, f"not a JSON chat list ({err})")
    problem = _chat_problem(message)
    if problem is not None:
        return RowProblem(where, config.prompt_key, problem)
    return PromptRow(index, message, str(raw[config.label_key]), where)


def read_rows(
    config: DatasetConfig, settings: S3Settings | None = None
) -> tuple[list[PromptRow], list[RowProblem]]:
    """Every row of the dataset in one pass, with image references made absolute (against
    `image_root`, else the file's folder), and the rows that cannot be parsed. The first
    `max_samples` non-blank lines are read."""
    rows: list[PromptRow] = []
    problems: list[RowProblem] = []
    for source, name, text in _read_text(config.uri, settings):
        base = config.image_root or _parent_uri(source)
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            if config.max_samples is not None and len(rows) + len(problems) >= config.max_samples:
                return rows, problems
            where = f"{name}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(RowProblem(where, "line", f"not JSON ({err})"))
                continue
            row = parse_row(raw, len(rows), config, where)
            if isinstance(row, RowProblem):
                problems.append(row)
                continue
            messages = absolutise_images(row.messages, base)
            rows.append(PromptRow(row.index, messages, row.label, where))
    if not rows and not problems:
        raise DatasetError(f"{config.uri}: the dataset is empty")
    return rows, problems


def load_dataset(config: DatasetConfig, settings: S3Settings | None = None) -> list[PromptRow]:
    """The rows, failing on the first one that cannot be parsed (images are not opened:
    `lmmr1_trainer.preflight` checks those)."""
    rows, problems = read_rows(config, settings)
    if problems:
        raise DatasetError(f"{config.uri}: {problems[0]}")
    return rows


def image_refs(messages: list[ChatMessage]) -> list[str]:
    refs: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for item in content:
                if isinstance(item, dict) and item.get("type") == "image" and "image" in item:
                    refs.append(str(item["image"]))
    return refs


def _map_images(messages: list[ChatMessage], change: Any) -> list[ChatMessage]:
    result = copy.deepcopy(messages)
    for message in result:
        content = message.get("content")
        if isinstance(content, list):
            for item in content:
                if isinstance(item, dict) and item.get("type") == "image" and "image" in item:
                    item["image"] = change(str(item["image"]))
    return result


def absolutise_images(messages: list[ChatMessage], base: str) -> list[ChatMessage]:
    def change(ref: str) -> str:
        parts = urlsplit(ref)
        if parts.scheme in ("s3", "data", "http", "https", "pvc") or (
            parts.scheme in ("file", "") and parts.path.startswith("/") and not parts.netloc
        ):
            return ref
        relative = (parts.netloc + parts.path) if parts.scheme == "file" else ref
        return f"{base.rstrip('/')}/{relative}"

    return _map_images(messages, change)


class ImageLoader:
    """Reads image bytes from file://, s3://, pvc:// or data: references (with a cache)."""

    def __init__(self, settings: S3Settings | None = None, cache_size: int = 4096) -> None:
        self.settings = settings
        self._cache: dict[str, bytes] = {}
        self._cache_size = cache_size
        self._buckets: dict[str, Storage] = {}
        self._lock = threading.Lock()

    def read(self, ref: str) -> bytes:
        if ref in self._cache:
            return self._cache[ref]
        parts = urlsplit(ref)
        if parts.scheme == "data":
            data = base64.b64decode(ref.split(",", 1)[1])
        elif parts.scheme == "s3":
            data = self._bucket(parts.netloc).get_bytes(parts.path.lstrip("/"))
        else:
            path = local_path(ref)
            if not path.is_file():
                raise ImageMissing(f"image {ref}: no such file")
            data = path.read_bytes()
        if len(self._cache) < self._cache_size:
            self._cache[ref] = data
        return data

    def _bucket(self, name: str) -> Storage:
        """One S3 client per bucket, made once: the pre-flight reads from several threads,
        and creating boto3 clients concurrently is not thread-safe."""
        with self._lock:
            if name not in self._buckets:
                self._buckets[name] = open_storage(f"s3://{name}", self.settings)
            return self._buckets[name]

    def inline(self, messages: list[ChatMessage]) -> list[ChatMessage]:
        """The chat with every image as a `data:` URL, ready to send to a rollout server."""

        def change(ref: str) -> str:
            if ref.startswith("data:"):
                return ref
            return "data:image/png;base64," + base64.b64encode(self.read(ref)).decode()

        return _map_images(messages, change)


def decode_images(messages: list[ChatMessage], loader: ImageLoader | None = None) -> list[Any]:
    """The chat's images as RGB PIL images, in order."""
    from PIL import Image

    loader = loader or ImageLoader()
    return [Image.open(io.BytesIO(loader.read(ref))).convert("RGB") for ref in image_refs(messages)]


@dataclass
class PromptSampler:
    """Seeded shuffling with a resumable position: epoch `e` is the permutation of
    `random.Random(seed + e)`; batches never straddle epochs (the tail is dropped, as in
    OpenRLHF's `drop_last`). `state_dict()` goes into the checkpoint."""

    size: int
    seed: int
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def _permutation(self) -> list[int]:
        if not self._order:
            self._order = list(range(self.size))
            random.Random(self.seed + self.epoch).shuffle(self._order)
        return self._order

    def next_batch(self, batch_size: int) -> list[int]:
        if batch_size > self.size:
            raise DatasetError(f"batch of {batch_size} prompts from a dataset of {self.size}")
        if self.position + batch_size > self.size:
            self.epoch, self.position, self._order = self.epoch + 1, 0, []
        batch = self._permutation()[self.position : self.position + batch_size]
        self.position += batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {
            "size": self.size,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise DatasetError(
                f"the checkpoint's data position is for {state['size']} rows with seed "
                f"{state['seed']}, the dataset has {self.size} rows with seed {self.seed}"
            )
        self.epoch, self.position, self._order = state["epoch"], state["position"], []
