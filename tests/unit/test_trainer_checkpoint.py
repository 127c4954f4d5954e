"""Checkpoints on the local storage back end: manifest last, uncommitted ignored, retention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmmr1_trainer.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointStore,
    retention_victims,
)
from lmmr1_trainer.storage import LocalStorage, open_storage


def _files(root: Path, step: int) -> Path:
    local = root / f"local-{step}"
    (local / "trainer_state").mkdir(parents=True)
    (local / "model.safetensors").write_bytes(b"w" * (100 + step))
    (local / "config.json").write_text("{}")
    (local / "trainer_state" / "state.pt").write_bytes(b"s" * step)
    return local


def _save(store: CheckpointStore, root: Path, step: int, final: bool = False) -> str:
    return store.commit(step, store.upload(step, _files(root, step)), final=final)


def test_retention_keeps_the_newest_and_protected() -> None:
    assert retention_victims([1, 2, 3, 4, 5], 3, set()) == [1, 2]
    assert retention_victims([1, 2, 3, 4, 5], 3, {1}) == [2]
    assert retention_victims([5, 1, 3], 5, set()) == []
    assert retention_victims([1, 2], 0, {2}) == [1]


def test_a_checkpoint_counts_only_once_its_manifest_is_written(tmp_path: Path) -> None:
    store = CheckpointStore(LocalStorage(tmp_path / "ckpt"))
    assert store.latest() is None
    entries = store.upload(20, _files(tmp_path, 20))
    assert store.latest() is None  # files uploaded, not committed
    assert sorted(e.path for e in entries) == [
        "config.json", "model.safetensors", "trainer_state/state.pt"
    ]  # fmt: skip
    uri = store.commit(20, entries)
    assert uri == f"{tmp_path}/ckpt/step-20" and store.latest() == 20
    manifest = json.loads((tmp_path / "ckpt" / "step-20" / MANIFEST).read_text())
    assert {f["path"]: f["size"] for f in manifest["files"]}["model.safetensors"] == 120
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])


def test_commit_refuses_files_that_did_not_arrive(tmp_path: Path) -> None:
    store = CheckpointStore(LocalStorage(tmp_path / "ckpt"))
    entries = store.upload(1, _files(tmp_path, 1))
    (tmp_path / "ckpt" / "step-1" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        store.commit(1, entries)
    assert store.latest() is None


def test_download_verifies_checksums(tmp_path: Path) -> None:
    store = CheckpointStore(LocalStorage(tmp_path / "ckpt"))
    _save(store, tmp_path, 3)
    manifest = store.download(3, tmp_path / "restored", skip_prefix="trainer_state/")
    assert manifest.step == 3 and (tmp_path / "restored" / "config.json").exists()
    assert not (tmp_path / "restored" / "trainer_state").exists()
    (tmp_path / "ckpt" / "step-3" / "model.safetensors").write_bytes(b"x" * 103)
    with pytest.raises(CheckpointError, match="checksum"):
        store.download(3, tmp_path / "again")
    with pytest.raises(CheckpointError, match="not committed"):
        store.download(4, tmp_path / "none")


def test_prune_keeps_last_k_the_resumed_and_final_ones_and_drops_leftovers(tmp_path: Path) -> None:
    store = CheckpointStore(LocalStorage(tmp_path / "ckpt"))
    for step in (2, 4, 6, 8):
        _save(store, tmp_path, step, final=(step == 2))  # say step 2 ended an earlier stage
    store.upload(5, _files(tmp_path, 5))  # a crash left step 5 uncommitted
    store.upload(9, _files(tmp_path, 9))  # step 9 is still being written
    removed = store.prune(keep_last=2, protected={4})
    assert removed == [5]  # 2 is final, 4 resumed from, 6 and 8 the newest two
    _save(store, tmp_path, 10)
    assert store.prune(keep_last=2, protected=set()) == [4, 6, 9]
    assert store.committed_steps() == [2, 8, 10]
    assert not (tmp_path / "ckpt" / "step-6").exists()  # no empty directories left


def test_step_names_do_not_match_by_prefix(tmp_path: Path) -> None:
    store = CheckpointStore(open_storage(str(tmp_path / "ckpt")))
    _save(store, tmp_path, 1)
    _save(store, tmp_path, 10)
    store.delete(1)
    assert store.committed_steps() == [10]
