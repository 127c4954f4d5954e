"""Solvable Sokoban levels by reverse play, as gym-sokoban makes them (its idea, our code).

1. A room: a random walk carves floor out of a walled rectangle (the border stays wall), so
   the floor is connected.
2. A solved state: targets on random floor cells with a box on each, the player elsewhere.
3. Reverse play: random walks of the player that may *pull* the box behind it. A pull run
   backwards is a push, so every state reached can be solved by replaying the walk
   backwards. Each walk keeps the state whose boxes moved furthest from their targets
   (no box left on a target, the player on none).
4. The breadth-first solver solves the few furthest-scrambled of those and the level with
   the longest shortest solution is kept; one whose shortest solution is longer than
   `max_solution_moves` (default 50, the most actions the reward replays) is thrown away,
   so every level can be solved inside the replay.

Everything is drawn from one `random.Random`: the same seed gives the same levels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lmmr1_trainer.tasks.sokoban.game import Direction, shifted
from lmmr1_trainer.tasks.sokoban.level import Level, Position
from lmmr1_trainer.tasks.sokoban.solver import solve

_DIRECTIONS = (Direction.UP, Direction.DOWN, Direction.LEFT, Direction.RIGHT)
REPLAY_LIMIT = 50  # the reward replays at most this many actions (verifier.sokoban)
CANDIDATES_SOLVED = 3


@dataclass(frozen=True)
class LevelSpec:
    """What to generate. Defaults: gym-sokoban's Sokoban-small-v0 (7x7, 2 boxes)."""

    height: int = 7
    width: int = 7
    boxes: int = 2
    # Reverse-play steps per walk; None: 3 * (height + width), longer than gym-sokoban's
    # 1.7 * (height + width), which gave mostly 2-to-6-move levels here.
    walk_steps: int | None = None
    walks: int = 16
    max_solution_moves: int = REPLAY_LIMIT
    min_solution_moves: int = 1
    attempts: int = 500

    def __post_init__(self) -> None:
        if self.height < 4 or self.width < 4:
            raise ValueError(f"a level is at least 4x4, not {self.height}x{self.width}")
        interior = (self.height - 2) * (self.width - 2)
        if not 1 <= self.boxes <= interior // 3:
            raise ValueError(
                f"boxes: {self.boxes} does not fit a {self.height}x{self.width} room "
                f"(1 to {interior // 3})"
            )
        if not 1 <= self.min_solution_moves <= self.max_solution_moves:
            raise ValueError("need 1 <= min_solution_moves <= max_solution_moves")

    @property
    def steps(self) -> int:
        return self.walk_steps or 3 * (self.height + self.width)


@dataclass(frozen=True)
class GeneratedLevel:
    level: Level
    solution: tuple[Direction, ...]  # a shortest solution


class GenerationError(RuntimeError):
    """No acceptable level within `LevelSpec.attempts` tries."""


def carve_room(rng: random.Random, spec: LevelSpec) -> frozenset[Position]:
    """Connected floor cells inside the border, carved by a turning random walk."""
    interior = (spec.height - 2) * (spec.width - 2)
    wanted = rng.randint(max(spec.boxes * 3 + 2, interior // 2), max(interior * 3 // 4, 1))
    cell = (rng.randint(1, spec.height - 2), rng.randint(1, spec.width - 2))
    direction = rng.choice(_DIRECTIONS)
    floor = {cell}
    for _ in range(interior * 20):
        if len(floor) >= wanted:
            break
        if rng.random() < 0.35:
            direction = rng.choice(_DIRECTIONS)
        ahead = shifted(cell, direction)
        if 1 <= ahead[0] <= spec.height - 2 and 1 <= ahead[1] <= spec.width - 2:
            cell = ahead
            floor.add(cell)
    return frozenset(floor)


def _walls(spec: LevelSpec, floor: frozenset[Position]) -> frozenset[Position]:
    every = {(r, c) for r in range(spec.height) for c in range(spec.width)}
    return frozenset(every - floor)


def _displacement(origins: list[Position], boxes: list[Position]) -> int:
    return sum(abs(a[0] - b[0]) + abs(a[1] - b[1]) for a, b in zip(origins, boxes, strict=True))


def reverse_play(rng: random.Random, solved: Level, spec: LevelSpec) -> list[Level]:
    """Each reverse walk's furthest-scrambled acceptable state, furthest first."""
    origins = sorted(solved.boxes)
    found: dict[Level, int] = {}
    for _ in range(spec.walks):
        boxes = list(origins)
        player = solved.player
        best: Level | None = None
        best_score = 0
        for _ in range(spec.steps):
            direction = rng.choice(_DIRECTIONS)
            ahead = shifted(player, direction)
            if not solved.is_free(ahead) or ahead in boxes:
                continue
            behind = shifted(player, _opposite(direction))
            if behind in boxes and rng.random() < 0.8:
                boxes[boxes.index(behind)] = player  # pulled into the cell the player leaves
            player = ahead
            state = solved.with_state(frozenset(boxes), player)
            score = _displacement(origins, boxes)
            if score > best_score and _acceptable(state):
                best, best_score = state, score
        if best is not None:
            found[best] = best_score
    return sorted(found, key=lambda state: -found[state])


def _opposite(direction: Direction) -> Direction:
    return {
        Direction.UP: Direction.DOWN,
        Direction.DOWN: Direction.UP,
        Direction.LEFT: Direction.RIGHT,
        Direction.RIGHT: Direction.LEFT,
    }[direction]


def _acceptable(state: Level) -> bool:
    """No box starts on a target and the player stands on none (see game.py: the
    reference's loader scores such levels differently)."""
    return not (state.boxes & state.targets) and state.player not in state.targets


def generate_level(rng: random.Random, spec: LevelSpec) -> GeneratedLevel:
    """One solvable level by `spec`, with a shortest solution; raises GenerationError."""
    for _ in range(spec.attempts):
        floor = carve_room(rng, spec)
        if len(floor) < spec.boxes + 2:
            continue
        cells = sorted(floor)
        targets = frozenset(rng.sample(cells, spec.boxes))
        player = rng.choice([c for c in cells if c not in targets])
        solved = Level(spec.height, spec.width, _walls(spec, floor), targets, targets, player)
        best: GeneratedLevel | None = None
        # The furthest-scrambled few, solved: the one with the longest shortest solution.
        for level in reverse_play(rng, solved, spec)[:CANDIDATES_SOLVED]:
            moves = solve(level).moves
            if moves is None or not (
                spec.min_solution_moves <= len(moves) <= spec.max_solution_moves
            ):
                continue
            if best is None or len(moves) > len(best.solution):
                best = GeneratedLevel(level, moves)
        if best is not None:
            return best
    raise GenerationError(
        f"no {spec.height}x{spec.width} level with {spec.boxes} boxes and a shortest solution "
        f"of {spec.min_solution_moves} to {spec.max_solution_moves} moves in {spec.attempts} "
        "attempts"
    )
