"""Dataset rows, images, synthetic data, and the seeded, resumable prompt order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmmr1_trainer.config import DatasetConfig
from lmmr1_trainer.data import (
    DatasetError,
    ImageLoader,
    PromptSampler,
    decode_images,
    image_refs,
    load_dataset,
)
from lmmr1_trainer.synthetic import generate_rows, main, write_dataset


def test_the_same_seed_gives_the_same_order_and_epochs_differ() -> None:
    a, b = PromptSampler(10, seed=7), PromptSampler(10, seed=7)
    first = [a.next_batch(3) for _ in range(6)]
    assert first == [b.next_batch(3) for _ in range(6)]
    epoch0 = [i for batch in first[:3] for i in batch]
    assert len(set(epoch0)) == 9  # no repeats within an epoch; the 10th row is dropped
    assert first[3:] != first[:3]  # epoch 1 is another permutation
    assert PromptSampler(10, seed=8).next_batch(3) != first[0]


def test_resuming_from_a_saved_position_continues_the_same_sequence() -> None:
    straight = PromptSampler(12, seed=1)
    expected = [straight.next_batch(5) for _ in range(7)]
    interrupted = PromptSampler(12, seed=1)
    done = [interrupted.next_batch(5) for _ in range(3)]
    state = json.loads(json.dumps(interrupted.state_dict()))  # as stored in a checkpoint
    resumed = PromptSampler(12, seed=1)
    resumed.load_state_dict(state)
    assert done + [resumed.next_batch(5) for _ in range(4)] == expected
    with pytest.raises(DatasetError, match="13 rows"):
        PromptSampler(13, seed=1).load_state_dict(state)


def test_load_rows_with_relative_images_and_chat_lists(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    from PIL import Image

    Image.new("RGB", (30, 30), "red").save(tmp_path / "img" / "a.png")
    chat = [{"role": "user", "content": [{"type": "image", "image": "file://img/a.png"},
                                         {"type": "text", "text": "colour?"}]}]  # fmt: skip
    rows = [
        {"message": json.dumps(chat), "answer": "red"},
        {"message": [{"role": "user", "content": "What is 2 + 2?"}], "answer": 4},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    loaded = load_dataset(DatasetConfig(uri=str(tmp_path / "train.jsonl"), type="multimodal"))
    assert [r.label for r in loaded] == ["red", "4"]
    assert image_refs(loaded[0].messages) == [f"{tmp_path}/img/a.png"]
    assert loaded[1].messages == [{"role": "user", "content": "What is 2 + 2?"}]
    images = decode_images(loaded[0].messages)
    assert images[0].size == (30, 30)
    inline = ImageLoader().inline(loaded[0].messages)
    assert image_refs(inline)[0].startswith("data:image/png;base64,")
    capped = DatasetConfig(uri=str(tmp_path), type="multimodal", max_samples=1)
    assert len(load_dataset(capped)) == 1  # a directory: every *.jsonl under it


def test_malformed_rows_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:1 message: missing \(the row has"):
        load_dataset(DatasetConfig(uri=str(tmp_path / "bad.jsonl"), type="text"))
    # A string that is not a JSON chat list used to become a one-turn prompt of its own text.
    plain = json.dumps({"message": "What is 2 + 2?", "answer": "4"})
    (tmp_path / "plain.jsonl").write_text("\n" + plain + "\n")
    with pytest.raises(DatasetError, match=r"plain\.jsonl:2 message: not a JSON chat list"):
        load_dataset(DatasetConfig(uri=str(tmp_path / "plain.jsonl"), type="text"))
    with pytest.raises(DatasetError, match=r"no \.jsonl"):
        load_dataset(DatasetConfig(uri=str(tmp_path / "empty"), type="text"))


def test_synthetic_tasks_are_deterministic_and_correct() -> None:
    assert generate_rows("arithmetic", 5, 3) == generate_rows("arithmetic", 5, 3)
    for row in generate_rows("arithmetic", 20, 0):
        a, op, b = row.question.removeprefix("What is ").removesuffix("?").split()
        assert str(eval(f"{a}{op}{b}")) == row.answer
    counting, digits = generate_rows("mixed", 2, 0)
    assert counting.question.startswith("How many") and counting.image_png
    assert digits.question.startswith("What number") and digits.answer.isdigit()


def test_synthetic_cli_writes_jsonl_and_pngs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--task", "counting", "--count", "3", "--out", str(tmp_path)]) == 0
    assert "wrote 3 counting rows" in capsys.readouterr().out
    rows = load_dataset(DatasetConfig(uri=str(tmp_path / "train.jsonl"), type="multimodal"))
    assert len(rows) == 3 and len(list((tmp_path / "images").glob("*.png"))) == 3
    assert all(len(decode_images(r.messages)) == 1 for r in rows)
    uri = write_dataset("arithmetic", 2, 0, str(tmp_path / "text"))
    assert uri.endswith("text/train.jsonl")
