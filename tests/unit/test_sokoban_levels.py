"""Sokoban levels (`lmmr1_trainer.tasks.sokoban`): the XSB label round-trips and bad levels
are named; the solver finds shortest solutions and proves unsolvable ones; generated levels
are solvable inside the reward's 50-action replay (breadth-first search, then played), start
with no box and no player on a target, and the same seed gives the same levels and frames;
frames decode and show the level; the CLI's dataset passes the trainer's pre-flight check
with a real tiny Qwen2.5-VL processor.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from lmmr1_trainer.config import StageConfig
from lmmr1_trainer.models import ChatEncoder
from lmmr1_trainer.preflight import checked_rows
from lmmr1_trainer.tasks.sokoban.__main__ import main
from lmmr1_trainer.tasks.sokoban.dataset import generate_rows
from lmmr1_trainer.tasks.sokoban.game import Direction, Game
from lmmr1_trainer.tasks.sokoban.generate import REPLAY_LIMIT, LevelSpec, generate_level
from lmmr1_trainer.tasks.sokoban.level import Level, LevelError
from lmmr1_trainer.tasks.sokoban.render import BOX_COLOUR, PLAYER_COLOUR, render_png
from lmmr1_trainer.tasks.sokoban.solver import solve
from lmmr1_trainer.tiny_model import build_tiny_model

CORRIDOR = "#######\n#@ $ .#\n#######"


def test_a_level_round_trips_through_its_text() -> None:
    text = "#######\n#+ $* #\n# $.  #\n#######"
    level = Level.parse(text)
    assert level.to_text() == text
    assert (level.player, len(level.boxes), len(level.targets)) == ((1, 1), 3, 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("#@$.#\n#@  #", "exactly one player"),
        ("#@ .#", "no box"),
        ("#@$$.#", "2 boxes but 1 targets"),
        ("#@$x.#", "unknown character 'x' at row 0, column 3"),
        ("#" * 5000, "over 4096"),
    ],
)
def test_a_bad_level_is_named(text: str, message: str) -> None:
    with pytest.raises(LevelError, match=message):
        Level.parse(text)


def test_the_solver_finds_a_shortest_solution() -> None:
    result = solve(Level.parse(CORRIDOR))
    assert result.moves == (Direction.RIGHT,) * 3 and result.exhausted


def test_the_solver_proves_a_level_unsolvable() -> None:
    cornered = Level.parse("#####\n#$ @#\n#  .#\n#####")  # the box is stuck in a corner
    assert solve(cornered).moves is None and solve(cornered).exhausted
    walled = Level.parse("#######\n#@$#. #\n#######")
    assert solve(walled).moves is None


def test_the_solver_gives_up_past_its_budget() -> None:
    result = solve(Level.parse("#########\n#@ $   .#\n#  $   .#\n#########"), max_states=5)
    assert result.moves is None and not result.exhausted


@pytest.mark.parametrize("boxes", [1, 2, 3])
def test_generated_levels_are_solvable_inside_the_replay(boxes: int) -> None:
    rng = random.Random(boxes)
    for _ in range(15):
        generated = generate_level(rng, LevelSpec(boxes=boxes))
        level = generated.level
        assert len(level.boxes) == len(level.targets) == boxes
        assert not level.boxes & level.targets and level.player not in level.targets
        assert all(not level.is_free((r, c)) for r in (0, 6) for c in range(7))  # walled
        shortest = solve(level)
        assert shortest.moves is not None
        assert len(shortest.moves) == len(generated.solution) <= REPLAY_LIMIT
        game = Game(level)
        rewards = [game.step(move) for move in generated.solution]
        assert game.solved and rewards[-1] == pytest.approx(10.9)


def test_the_shortest_solution_bounds_are_kept() -> None:
    spec = LevelSpec(boxes=2, min_solution_moves=8, max_solution_moves=12)
    rng = random.Random(0)
    assert all(8 <= len(generate_level(rng, spec).solution) <= 12 for _ in range(5))


def test_the_same_seed_gives_the_same_levels_and_frames() -> None:
    specs = [LevelSpec(boxes=2), LevelSpec(boxes=3)]
    first = [(r.level_id, r.generated, r.image_png) for r in generate_rows(6, 7, specs, 112)]
    again = [(r.level_id, r.generated, r.image_png) for r in generate_rows(6, 7, specs, 112)]
    other = [r.generated for r in generate_rows(6, 8, specs, 112)]
    assert first == again
    assert [g for _, g, _ in first] != other
    assert [len(g.level.boxes) for _, g, _ in first] == [2, 3] * 3


def test_a_frame_decodes_and_shows_the_level() -> None:
    level = Level.parse(CORRIDOR)
    image = Image.open(io.BytesIO(render_png(level, 16)))
    image.load()
    assert image.size == (7 * 16, 3 * 16)
    centre = 8  # the middle of a 16-pixel cell
    rgb = image.convert("RGB")
    assert rgb.getpixel((1 * 16 + centre - 4, 16 + centre)) == PLAYER_COLOUR
    assert rgb.getpixel((3 * 16 + 3, 16 + 3)) == BOX_COLOUR


def _stage(uri: Path, max_prompt_length: int) -> StageConfig:
    return StageConfig.model_validate(
        {
            "run": {"namespace": "ns", "name": "r", "stage": "sokoban", "stage_index": 0},
            "init_from": "/unused",
            "dataset": {"uri": str(uri), "type": "multimodal"},
            "algorithm": {"max_prompt_length": max_prompt_length},
            "reward": {"url": "http://127.0.0.1:1", "verifier": "sokoban"},
            "checkpoint": {"uri": "/unused"},
            "progress": {"configmap": "c", "namespace": "ns"},
        }
    )


def test_the_cli_dataset_passes_the_pre_flight_check(tmp_path: Path) -> None:
    out = tmp_path / "sokoban"
    argv = ["generate", "--out", str(out), "--count", "4", "--seed", "3", "--image-height", "112"]
    assert main(argv) == 0
    lines = (out / "train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 4 and len(list((out / "images").glob("*.png"))) == 4
    for row in rows:
        level = Level.parse(row["answer"])  # the label is the level the verifier replays
        assert solve(level).moves is not None
        assert len(solve(level).moves or ()) == row["solution_length"]
        chat = json.loads(row["message"])
        assert chat[1]["content"][0] == {"type": "image", "image": f"images/{row['question']}.png"}
        assert "Left, Right, Up, Down" in chat[1]["content"][1]["text"]
    encoder = ChatEncoder.load(build_tiny_model(tmp_path / "tiny"))
    checked, skipped = checked_rows(_stage(out / "train.jsonl", 4096), encoder)
    assert (len(checked), skipped) == (4, 0)
    assert [row.label for row in checked] == [row["answer"] for row in rows]


def test_the_cli_refuses_impossible_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--out", "/tmp/unused", "--boxes", "20"])
    assert "boxes: 20 does not fit" in capsys.readouterr().err


def test_the_cli_solves_a_level(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "level.txt").write_text(CORRIDOR)
    assert main(["solve", "--level", str(tmp_path / "level.txt")]) == 0
    assert capsys.readouterr().out.strip() == "Right, Right, Right"
