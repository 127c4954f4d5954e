"""The dataset's pre-flight check on real files: every kind of bad row is named by file,
line and field; `onBadRow: skip` counts them and keeps the rest; images resolve against
`imageRoot` (a folder, or a `pvc://` claim under the mount root); prompt lengths match what
the processor makes of the row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from tests.trainer_harness import stage_config, start_trainer, write_stage, write_token

from lmmr1_trainer.checkpoint import CheckpointStore
from lmmr1_trainer.config import EXIT_CONFIG_ERROR, StageConfig
from lmmr1_trainer.data import DatasetError, ImageLoader, decode_images, image_refs, read_rows
from lmmr1_trainer.models import ChatEncoder
from lmmr1_trainer.preflight import MAX_EXAMPLES, check_rows, checked_rows, inspect_image
from lmmr1_trainer.storage import open_storage, sha256_file
from lmmr1_trainer.synthetic import chat_message
from lmmr1_trainer.tiny_model import build_tiny_model
from lmmr1_trainer.train import node_workdir, step_records


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def encoder(model_dir: Path) -> ChatEncoder:
    return ChatEncoder.load(model_dir)


def _image_chat(ref: str, question: str = "What colour?") -> str:
    return json.dumps(chat_message(question, ref))


def _stage(dataset: dict[str, Any], **algorithm: Any) -> StageConfig:
    return StageConfig.model_validate(
        {
            "run": {"namespace": "ns", "name": "r", "stage": "mgt", "stage_index": 0},
            "init_from": "/unused",
            "dataset": {"type": "multimodal", **dataset},
            "algorithm": algorithm,
            "reward": {"url": "http://127.0.0.1:1"},
            "checkpoint": {"uri": "/unused"},
            "progress": {"configmap": "c", "namespace": "ns"},
        }
    )


def _write_png(path: Path, size: tuple[int, int] = (32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "red").save(path)
    return path


def _write_rows(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _bad_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """train.jsonl (line numbers in the comments) with images under images/."""
    images = tmp_path / "images"
    good = _write_png(images / "img" / "good.png")
    truncated = images / "img" / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])  # a header, then nothing
    flipped = bytearray(good.read_bytes())
    flipped[-20] ^= 0xFF  # one byte of the compressed data: the checksum no longer matches
    (images / "img" / "flipped.png").write_bytes(bytes(flipped))
    (images / "img" / "text.png").write_text("not an image")
    lines = [
        json.dumps({"message": _image_chat("img/good.png"), "answer": "red"}),  # 1 good
        json.dumps({"message": "What is 2 + 2?", "answer": "4"}),  # 2 not a JSON chat
        json.dumps({"message": _image_chat("img/good.png")}),  # 3 no answer
        json.dumps({"message": _image_chat("img/missing.png"), "answer": "red"}),  # 4
        json.dumps({"message": _image_chat("img/truncated.png"), "answer": "red"}),  # 5
        json.dumps({"message": _image_chat("img/flipped.png"), "answer": "red"}),  # 6
        json.dumps({"message": _image_chat("img/text.png"), "answer": "red"}),  # 7
        json.dumps({"message": _image_chat("/home/someone/data/a.png"), "answer": "x"}),  # 8
        json.dumps({"message": _image_chat("img/good.png", "why? " * 400), "answer": "x"}),  # 9
        "",  # 10: blank lines are not rows
        '{"message": "[", ',  # 11 not JSON
        json.dumps({"message": json.dumps([{"text": "no role"}]), "answer": "x"}),  # 12
        json.dumps({"message": chat_message("What is 3 + 3?", None), "answer": 6}),  # 13 good
    ]
    return _write_rows(tmp_path / "data" / "train.jsonl", lines), images


EXPECTED_BAD = {
    "train.jsonl:2": ("message", "not a JSON chat list"),
    "train.jsonl:3": ("answer", "missing"),
    "train.jsonl:4": ("image", "no such file: "),
    "train.jsonl:5": ("image", "truncated"),
    "train.jsonl:6": ("image", "checksum"),
    "train.jsonl:7": ("image", "UnidentifiedImageError: "),
    "train.jsonl:8": ("image", "no such file: /home/someone/data/a.png"),
    "train.jsonl:9": ("message", "> algorithm.max_prompt_length (256)"),
    "train.jsonl:11": ("line", "not JSON"),
    "train.jsonl:12": ("message", "turn 0 must be an object with 'role' and 'content'"),
}


def test_every_bad_row_is_named_by_line_and_field_and_the_stage_fails(
    tmp_path: Path, encoder: ChatEncoder
) -> None:
    data, images = _bad_dataset(tmp_path)
    stage = _stage({"uri": str(data), "image_root": str(images)}, max_prompt_length=256)
    with pytest.raises(DatasetError) as failed:
        checked_rows(stage, encoder)
    message = str(failed.value)
    assert message.startswith(f"{len(EXPECTED_BAD)} of 12 dataset rows are bad:")
    assert "dataset.onBadRow: skip" in message
    reported = message.splitlines()[1 : 1 + MAX_EXAMPLES]
    assert [line.split()[0] for line in reported] == list(EXPECTED_BAD)  # file order
    for line, (where, (field, reason)) in zip(reported, EXPECTED_BAD.items(), strict=True):
        assert line.strip().startswith(f"{where} {field}: "), line
        assert reason.lower() in line.lower(), line


def test_skip_mode_keeps_the_good_rows_and_counts_the_bad(
    tmp_path: Path, encoder: ChatEncoder
) -> None:
    data, images = _bad_dataset(tmp_path)
    stage = _stage(
        {"uri": str(data), "image_root": str(images), "on_bad_row": "skip"},
        max_prompt_length=256,
    )
    rows, skipped = checked_rows(stage, encoder)
    assert skipped == len(EXPECTED_BAD)
    assert [(r.index, r.where, r.label) for r in rows] == [
        (0, "train.jsonl:1", "red"),
        (1, "train.jsonl:13", "6"),
    ]
    assert image_refs(rows[0].messages) == [f"{images}/img/good.png"]


def test_a_report_names_a_few_rows_and_counts_the_rest(
    tmp_path: Path, encoder: ChatEncoder
) -> None:
    lines = [json.dumps({"message": "plain text", "answer": "1"}) for _ in range(500)]
    data = _write_rows(tmp_path / "train.jsonl", lines)
    with pytest.raises(DatasetError) as failed:
        checked_rows(_stage({"uri": str(data)}), encoder)
    message = str(failed.value)
    assert f"and {500 - MAX_EXAMPLES} more" in message
    assert len(message.encode()) < 4096  # what the kubelet keeps of a termination message
    skip = _stage({"uri": str(data), "on_bad_row": "skip"})
    with pytest.raises(DatasetError, match="no row is left to train on"):
        checked_rows(skip, encoder)


def test_relative_images_resolve_against_a_pvc_image_root_under_the_mount_root(
    tmp_path: Path, encoder: ChatEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pvc://claim/path` is read from <LMMR1_PVC_ROOT>/<claim>/<path>, where the operator
    mounts the claim: the dataset on one claim, its images on another."""
    mounts = tmp_path / "mnt"
    monkeypatch.setenv("LMMR1_PVC_ROOT", str(mounts))
    _write_png(mounts / "pictures" / "set-1" / "img" / "a.png", (40, 24))
    _write_rows(
        mounts / "datasets" / "geo" / "train.jsonl",
        [json.dumps({"message": _image_chat(ref), "answer": "red"}) for ref in
         ("img/a.png", "file://img/a.png")],
    )  # fmt: skip
    stage = _stage({"uri": "pvc://datasets/geo/train.jsonl", "image_root": "pvc://pictures/set-1"})
    rows, skipped = checked_rows(stage, encoder)
    assert skipped == 0 and len(rows) == 2
    assert image_refs(rows[0].messages) == image_refs(rows[1].messages)
    assert image_refs(rows[0].messages) == ["pvc://pictures/set-1/img/a.png"]
    (image,) = decode_images(rows[0].messages, ImageLoader())
    assert image.size == (40, 24)
    # The same rows against a root without the picture: the rows are named, not trained on.
    missing = _stage({"uri": "pvc://datasets/geo/train.jsonl", "image_root": "pvc://pictures"})
    with pytest.raises(
        DatasetError, match=r"train.jsonl:1 image: no such file: pvc://pictures/img/a.png"
    ):
        checked_rows(missing, encoder)


def test_prompt_lengths_are_what_the_processor_makes_of_the_row(
    tmp_path: Path, encoder: ChatEncoder
) -> None:
    """The length check counts image tokens from the image's size; it must agree with the
    trainer's own encoding (`ChatEncoder.encode`) for every size, else rows that fit would
    be refused or rows that do not would pass."""
    sizes = [(32, 32), (40, 24), (300, 17), (17, 300), (512, 384), (29, 61)]
    lines = [json.dumps({"message": _image_chat(f"{w}x{h}.png"), "answer": "1"}) for w, h in sizes]
    lines.append(json.dumps({"message": chat_message("two images", None), "answer": "1"}))
    for w, h in sizes:
        _write_png(tmp_path / f"{w}x{h}.png", (w, h))
    data = _write_rows(tmp_path / "train.jsonl", lines)
    rows, problems = read_rows(_stage({"uri": str(data)}).dataset)
    loader = ImageLoader()
    trainer_lengths = [
        int(encoder.encode(r.messages, decode_images(r.messages, loader))["input_ids"].shape[-1])
        for r in rows
    ]
    assert len(set(trainer_lengths)) > 3  # the sizes make different prompt lengths
    exactly = check_rows(rows, problems, encoder, loader, max(trainer_lengths))
    assert exactly.problems == [] and len(exactly.rows) == len(rows)
    one_less = check_rows(rows, problems, encoder, loader, max(trainer_lengths) - 1)
    longest = [r.where for r, n in zip(rows, trainer_lengths, strict=True)
               if n == max(trainer_lengths)]  # fmt: skip
    assert [p.where for p in one_less.problems] == longest


def test_a_text_only_model_refuses_rows_with_images(tmp_path: Path) -> None:
    text_encoder = ChatEncoder.load(build_tiny_model(tmp_path / "text", text_only=True))
    _write_png(tmp_path / "a.png")
    data = _write_rows(
        tmp_path / "train.jsonl", [json.dumps({"message": _image_chat("a.png"), "answer": "1"})]
    )
    with pytest.raises(DatasetError, match=r"train\.jsonl:1 image: the model is text-only"):
        checked_rows(_stage({"uri": str(data), "type": "text"}), text_encoder)


def test_inspect_image_reports_the_size_of_a_good_image(tmp_path: Path) -> None:
    path = _write_png(tmp_path / "a.png", (40, 24))
    assert inspect_image(ImageLoader(), str(path)) == (24, 40)  # (height, width)


def _tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `root`: (size, mtime in ns, sha256)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, sha256_file(p))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_a_stage_with_one_bad_row_exits_78_naming_it_before_any_rollout(
    tmp_path: Path, model_dir: Path
) -> None:
    """The real stage entry point (`python -m lmmr1_trainer.train`), resuming from a
    committed checkpoint of an earlier attempt: it exits 78 with the row in its termination
    message (the operator fails the run at once with it), reports no step and no progress
    (so no rollout ran), and leaves the checkpoints exactly as they were."""
    data = tmp_path / "data"
    _write_png(data / "img" / "a.png")
    lines = [json.dumps({"message": _image_chat("img/a.png"), "answer": "red"})] * 2
    lines.insert(1, json.dumps({"message": _image_chat("img/gone.png"), "answer": "red"}))
    _write_rows(data / "train.jsonl", lines)
    checkpoints = tmp_path / "checkpoints"
    store = CheckpointStore(open_storage(str(checkpoints)))
    store.commit(1, store.upload(1, model_dir))  # the earlier attempt's step 1
    before = _tree(checkpoints)
    stage = stage_config(
        init_from=str(model_dir),
        dataset={"uri": str(data / "train.jsonl"), "type": "multimodal"},
        checkpoint_uri=str(checkpoints),
        rollout_urls=[],
        reward_url="http://127.0.0.1:1",  # never reached: the stage stops before
        token_file=write_token(tmp_path),
    )
    work = tmp_path / "work"
    work.mkdir()
    process = start_trainer(write_stage(tmp_path / "stage.yaml", stage), work)
    out, _ = process.communicate(timeout=400)
    assert process.returncode == EXIT_CONFIG_ERROR, out[-3000:]
    message = (work / "termination-log").read_text()
    assert message.startswith("stage config: 1 of 3 dataset rows are bad:"), message
    assert f"train.jsonl:2 image: no such file: {data}/img/gone.png" in message
    resumed = work / node_workdir(StageConfig.model_validate(stage)).name / "resume"
    assert (resumed / "config.json").is_file()  # it had downloaded step 1 to resume from
    assert step_records(out.splitlines()) == []
    assert not (work / "progress.json").exists()  # the first report follows the engine start
    assert _tree(checkpoints) == before
