"""Checkpoints: `<checkpoint.uri>/step-<N>/` with a manifest written last.

Layout of one checkpoint:
    step-<N>/config.json, model.safetensors, tokenizer*, processor*   HF model (loadable as is)
    step-<N>/trainer_state/state.pt                                 step, data position, RNG
    step-<N>/trainer_state/deepspeed/...                            optimizer, scheduler (ZeRO)
    step-<N>/trainer_state/critic/deepspeed/...                     gae: critic weights + optimizer
    step-<N>/manifest.json                                          files, sizes, sha256 (LAST)

A step directory without `manifest.json` does not exist for readers: an upload cut short
by a crash is ignored, and cleaned up by the next retention pass. Deleting a checkpoint
removes its manifest first, so no reader can see a manifest whose files are going away.
Retention keeps the newest `keep_last` committed checkpoints plus any protected one (the
one resumed from, and final ones).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from lmmr1_trainer.storage import (
    ObjectNotFound,
    Storage,
    StorageError,
    join_key,
    sha256_file,
    upload_tree,
)

MANIFEST = "manifest.json"
TRAINER_STATE_DIR = "trainer_state"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    size: int
    sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    step: int
    created_at: str
    final: bool = False
    files: list[FileEntry]


def step_dir(step: int) -> str:
    return f"step-{step}"


def parse_step(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def retention_victims(committed: list[int], keep_last: int, protected: set[int]) -> list[int]:
    """Committed steps to delete: all but the newest `keep_last`, never a protected one."""
    keep = set(sorted(committed)[-keep_last:]) if keep_last > 0 else set()
    return sorted(s for s in committed if s not in keep and s not in protected)


class CheckpointStore:
    """Committed checkpoints under one storage root (`checkpoint.uri`)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def uri(self, step: int) -> str:
        return f"{self.storage.uri.rstrip('/')}/{step_dir(step)}"

    def _steps(self) -> tuple[set[int], set[int]]:
        """(every step directory seen, steps with a manifest)."""
        seen: set[int] = set()
        committed: set[int] = set()
        for info in self.storage.list(""):
            head, _, rest = info.key.partition("/")
            step = parse_step(head)
            if step is None:
                continue
            seen.add(step)
            if rest == MANIFEST:
                committed.add(step)
        return seen, committed

    def committed_steps(self) -> list[int]:
        return sorted(self._steps()[1])

    def latest(self) -> int | None:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def manifest(self, step: int) -> Manifest:
        try:
            raw = self.storage.get_bytes(join_key(step_dir(step), MANIFEST))
        except ObjectNotFound as err:
            raise CheckpointError(f"{self.uri(step)} is not committed (no manifest)") from err
        except StorageError as err:
            raise CheckpointError(f"{self.uri(step)}: its manifest cannot be read: {err}") from err
        return Manifest.model_validate_json(raw)

    def upload(self, step: int, local_dir: Path) -> list[FileEntry]:
        """Upload a checkpoint's files (in parallel); does NOT commit it."""
        return [
            FileEntry(path=path, size=size, sha256=digest)
            for path, size, digest in upload_tree(self.storage, local_dir, step_dir(step))
        ]

    def commit(self, step: int, files: list[FileEntry], final: bool = False) -> str:
        """Write the manifest, which makes the checkpoint exist. Returns its URI."""
        listed = {info.key: info.size for info in self.storage.list(step_dir(step) + "/")}
        for entry in files:
            key = join_key(step_dir(step), entry.path)
            if listed.get(key) != entry.size:
                raise CheckpointError(
                    f"{self.uri(step)}/{entry.path}: expected {entry.size} bytes in storage, "
                    f"found {listed.get(key)}"
                )
        manifest = Manifest(
            step=step,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            final=final,
            files=sorted(files, key=lambda e: e.path),
        )
        data = json.dumps(manifest.model_dump(), indent=1).encode()
        self.storage.put_bytes(join_key(step_dir(step), MANIFEST), data)
        return self.uri(step)

    def download(self, step: int, dest: Path, skip_prefix: str | None = None) -> Manifest:
        """Download a committed checkpoint into `dest`, checking every size and checksum."""
        manifest = self.manifest(step)
        for entry in manifest.files:
            if skip_prefix and entry.path.startswith(skip_prefix):
                continue
            target = dest / entry.path
            self.storage.get_file(join_key(step_dir(step), entry.path), target)
            if target.stat().st_size != entry.size or sha256_file(target) != entry.sha256:
                raise CheckpointError(f"{self.uri(step)}/{entry.path}: checksum mismatch")
        return manifest

    def delete(self, step: int) -> None:
        prefix = step_dir(step) + "/"
        self.storage.delete([join_key(step_dir(step), MANIFEST)])  # uncommit first
        self.storage.delete(info.key for info in self.storage.list(prefix))

    def prune(self, keep_last: int, protected: set[int]) -> list[int]:
        """Apply retention; also remove uncommitted leftovers older than the newest commit."""
        seen, committed = self._steps()
        protected = protected | {s for s in committed if self.manifest(s).final}
        victims = retention_victims(sorted(committed), keep_last, protected)
        newest = max(committed) if committed else -1
        leftovers = [s for s in seen - committed if s < newest and s not in protected]
        for step in sorted(victims + leftovers):
            self.delete(step)
        return sorted(victims + leftovers)
