"""Breadth-first search over (player, boxes): a shortest solution in moves, which proves a
level solvable and says how long its best answer is.

Boxes are never pushed onto dead cells (cells from which no box can reach any target, found
by pulling a box backwards from every target), which prunes most of the search without
losing a solution. `max_states` bounds the work: past it the search gives up (None), so a
caller can tell "unsolvable" from "too big to know" only through `SolveResult.exhausted`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from lmmr1_trainer.tasks.sokoban.game import Direction, shifted
from lmmr1_trainer.tasks.sokoban.level import Level, Position

DEFAULT_MAX_STATES = 200_000
_ORDER = (Direction.UP, Direction.DOWN, Direction.LEFT, Direction.RIGHT)

State = tuple[Position, frozenset[Position]]


@dataclass(frozen=True)
class SolveResult:
    moves: tuple[Direction, ...] | None  # a shortest solution; None: none found
    exhausted: bool  # True: every reachable state was searched (None then means unsolvable)
    states: int


def live_cells(level: Level) -> frozenset[Position]:
    """Cells from which a box can still be pushed onto some target."""
    live = set(level.targets)
    frontier = deque(level.targets)
    while frontier:
        box = frontier.popleft()
        for direction in _ORDER:
            # Pulling the box one cell in `direction` needs the player there and one further.
            to = shifted(box, direction)
            stand = shifted(to, direction)
            if level.is_free(to) and level.is_free(stand) and to not in live:
                live.add(to)
                frontier.append(to)
    return frozenset(live)


def solve(level: Level, max_states: int = DEFAULT_MAX_STATES) -> SolveResult:
    """A shortest solution of `level` (fewest moves), searched breadth first."""
    if level.solved:
        return SolveResult((), True, 1)
    live = live_cells(level)
    if not level.boxes <= live:
        return SolveResult(None, True, 1)
    start: State = (level.player, level.boxes)
    parents: dict[State, tuple[State, Direction] | None] = {start: None}
    frontier: deque[State] = deque([start])
    while frontier:
        state = frontier.popleft()
        player, boxes = state
        for direction in _ORDER:
            ahead = shifted(player, direction)
            if not level.is_free(ahead):
                continue
            moved = boxes
            if ahead in boxes:
                beyond = shifted(ahead, direction)
                if beyond not in live or beyond in boxes or not level.is_free(beyond):
                    continue
                moved = (boxes - {ahead}) | {beyond}
            successor: State = (ahead, moved)
            if successor in parents:
                continue
            parents[successor] = (state, direction)
            if level.targets <= moved:
                return SolveResult(_path(parents, successor), True, len(parents))
            if len(parents) >= max_states:
                return SolveResult(None, False, len(parents))
            frontier.append(successor)
    return SolveResult(None, True, len(parents))


def _path(
    parents: dict[State, tuple[State, Direction] | None], end: State
) -> tuple[Direction, ...]:
    moves: list[Direction] = []
    link = parents[end]
    while link is not None:
        previous, direction = link
        moves.append(direction)
        link = parents[previous]
    return tuple(reversed(moves))
