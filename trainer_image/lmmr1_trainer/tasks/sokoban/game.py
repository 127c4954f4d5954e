"""Playing a level: one move and its environment reward, by gym-sokoban's rules (the
environment LMM-R1's Sokoban reward replays answers in).

A move walks the player one cell; a box in the way is pushed when the cell behind it is
free ground without a box, otherwise nothing moves. Every move, blocked or not, costs 0.1;
a move that raises the number of boxes on targets earns 1, one that lowers it loses 1, and
the move that covers the last target earns 10 more (so a winning push is worth 10.9).
The rewards are summed in that order, in Python floats, as gym-sokoban sums them.

The count of boxes on targets starts at the level's own count, so a box that starts on a
target earns nothing until it leaves and comes back. (gym-sokoban starts it at 0, and the
reference's level loader loses the target under a player that starts on one; generated
levels have neither, so the rules agree on them. See docs/verifier.md.)
"""

from __future__ import annotations

from enum import StrEnum

from lmmr1_trainer.tasks.sokoban.level import Level, Position

STEP_PENALTY = -0.1
BOX_ON_TARGET_REWARD = 1
BOX_OFF_TARGET_PENALTY = -1
SOLVED_REWARD = 10


class Direction(StrEnum):
    UP = "up"
    DOWN = "down"
    LEFT = "left"
    RIGHT = "right"

    @property
    def delta(self) -> Position:
        return _DELTAS[self]

    @property
    def word(self) -> str:
        """`Up`, `Down`, …: how prompts and answers spell it."""
        return self.value.capitalize()


_DELTAS: dict[Direction, Position] = {
    Direction.UP: (-1, 0),
    Direction.DOWN: (1, 0),
    Direction.LEFT: (0, -1),
    Direction.RIGHT: (0, 1),
}


def shifted(cell: Position, direction: Direction) -> Position:
    dr, dc = direction.delta
    return cell[0] + dr, cell[1] + dc


def apply_move(level: Level, direction: Direction) -> Level:
    """The state after one move (the same state when the move is blocked)."""
    ahead = shifted(level.player, direction)
    if not level.is_free(ahead):
        return level
    if ahead not in level.boxes:
        return level.with_state(level.boxes, ahead)
    beyond = shifted(ahead, direction)
    if not level.is_free(beyond) or beyond in level.boxes:
        return level
    return level.with_state((level.boxes - {ahead}) | {beyond}, ahead)


class Game:
    """A level being played: `step` moves and returns gym-sokoban's reward for the move."""

    def __init__(self, level: Level) -> None:
        self.level = level
        self.boxes_on_target = len(level.boxes & level.targets)

    @property
    def solved(self) -> bool:
        return self.level.solved

    def step(self, direction: Direction) -> float:
        self.level = apply_move(self.level, direction)
        reward = STEP_PENALTY
        on_target = len(self.level.boxes & self.level.targets)
        if on_target > self.boxes_on_target:
            reward += BOX_ON_TARGET_REWARD
        elif on_target < self.boxes_on_target:
            reward += BOX_OFF_TARGET_PENALTY
        if self.level.solved:
            reward += SOLVED_REWARD
        self.boxes_on_target = on_target
        return reward
