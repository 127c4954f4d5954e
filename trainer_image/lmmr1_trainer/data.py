"""The LMM-R1 dataset: rows, images, and a seeded shuffle with a resumable position.

A row is a JSON object with `message` (a JSON-encoded chat list, or the list itself) and
`answer` (key names from the stage's `DatasetConfig`). Images inside the chat are
`{"type": "image", "image": "file://…" | "s3://…" | "data:image/png;base64,…"}`; a relative
`file://` path is resolved against `dataset.image_root`, else the dataset's own directory.
Before a prompt goes to a rollout server its images are inlined as data URLs: the rollout
pods cannot read the trainer's files.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import random
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from lmmr1_trainer.config import DatasetConfig, S3Settings
from lmmr1_trainer.storage import Storage, local_path, open_storage

ChatMessage = dict[str, Any]


class DatasetError(ValueError):
    """A dataset that cannot be read or has a malformed row; the message names the row."""


@dataclass(frozen=True)
class PromptRow:
    index: int
    messages: list[ChatMessage]
    label: str


def _parent_uri(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def _read_text(uri: str, settings: S3Settings | None) -> list[tuple[str, str]]:
    """(source uri, text) for one JSONL file, or every *.jsonl under a directory/prefix."""
    if uri.endswith((".jsonl", ".json")):
        parent, _, name = uri.rpartition("/")
        return [(uri, open_storage(parent, settings).get_bytes(name).decode())]
    storage = open_storage(uri, settings)
    found = [o.key for o in storage.list("") if o.key.endswith(".jsonl")]
    if not found:
        raise DatasetError(f"{uri}: no .jsonl files")
    return [(f"{uri.rstrip('/')}/{key}", storage.get_bytes(key).decode()) for key in found]


def parse_row(raw: dict[str, Any], index: int, config: DatasetConfig) -> PromptRow:
    if config.prompt_key not in raw or config.label_key not in raw:
        raise DatasetError(
            f"row {index}: needs keys {config.prompt_key!r} and {config.label_key!r}, "
            f"has {sorted(raw)}"
        )
    message = raw[config.prompt_key]
    if isinstance(message, str):
        try:
            message = json.loads(message)
        except json.JSONDecodeError:  # a plain question: one user turn
            message = [{"role": "user", "content": message}]
    if not isinstance(message, list) or not all(isinstance(m, dict) for m in message):
        raise DatasetError(f"row {index}: {config.prompt_key!r} must be a chat list")
    label = raw[config.label_key]
    return PromptRow(index, message, "" if label is None else str(label))


def load_dataset(config: DatasetConfig, settings: S3Settings | None = None) -> list[PromptRow]:
    rows: list[PromptRow] = []
    image_root = config.image_root
    for source, text in _read_text(config.uri, settings):
        base = image_root or _parent_uri(source)
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{source}: row {len(rows)} is not JSON: {err}") from err
            row = parse_row(raw, len(rows), config)
            rows.append(PromptRow(row.index, absolutise_images(row.messages, base), row.label))
            if config.max_samples is not None and len(rows) >= config.max_samples:
                return rows
    if not rows:
        raise DatasetError(f"{config.uri}: the dataset is empty")
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

    def read(self, ref: str) -> bytes:
        if ref in self._cache:
            return self._cache[ref]
        parts = urlsplit(ref)
        if parts.scheme == "data":
            data = base64.b64decode(ref.split(",", 1)[1])
        elif parts.scheme == "s3":
            bucket = self._buckets.setdefault(
                parts.netloc, open_storage(f"s3://{parts.netloc}", self.settings)
            )
            data = bucket.get_bytes(parts.path.lstrip("/"))
        else:
            path = local_path(ref)
            if not path.is_file():
                raise DatasetError(f"image {ref}: no such file")
            data = path.read_bytes()
        if len(self._cache) < self._cache_size:
            self._cache[ref] = data
        return data

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
