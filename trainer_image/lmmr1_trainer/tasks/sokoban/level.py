"""A Sokoban board and its text form (the XSB convention), which is also the dataset's label.

Characters: `#` wall, ` ` (or `-`, `_`) floor, `.` target, `$` box, `*` box on a target,
`@` the player, `+` the player on a target. Rows are separated by newlines; a short row is
padded with wall, and a cell outside the board is a wall, so a board needs no border to be
safe (the generator draws one anyway). Positions are `(row, column)`.

A label must describe a playable level: exactly one player, at least one box and as many
targets as boxes. Pure Python: the verifier imports it in every worker.
"""

from __future__ import annotations

from dataclasses import dataclass

Position = tuple[int, int]

WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET = "# .$*@+"
_FLOOR_ALIASES = frozenset(" -_")
MAX_LEVEL_CHARS = 4096  # far above any generated level; a longer label is refused
MAX_SIDE = 64


class LevelError(ValueError):
    """A level text that does not describe a playable Sokoban level; says what is wrong."""


@dataclass(frozen=True)
class Level:
    """A board (walls, targets) and a state (boxes, player) on it."""

    height: int
    width: int
    walls: frozenset[Position]
    targets: frozenset[Position]
    boxes: frozenset[Position]
    player: Position

    def inside(self, cell: Position) -> bool:
        return 0 <= cell[0] < self.height and 0 <= cell[1] < self.width

    def is_free(self, cell: Position) -> bool:
        """Walkable ground (floor or target), whatever stands on it."""
        return self.inside(cell) and cell not in self.walls

    @property
    def floor(self) -> frozenset[Position]:
        """Every walkable cell of the board."""
        cells = ((r, c) for r in range(self.height) for c in range(self.width))
        return frozenset(cell for cell in cells if cell not in self.walls)

    @property
    def solved(self) -> bool:
        return self.targets <= self.boxes

    def with_state(self, boxes: frozenset[Position], player: Position) -> Level:
        return Level(self.height, self.width, self.walls, self.targets, boxes, player)

    def to_text(self) -> str:
        """The XSB text; `Level.parse(level.to_text()) == level`."""
        rows = []
        for r in range(self.height):
            row = []
            for c in range(self.width):
                row.append(self.char_at((r, c)))
            rows.append("".join(row))
        return "\n".join(rows)

    def char_at(self, cell: Position) -> str:
        if cell in self.walls:
            return WALL
        on_target = cell in self.targets
        if cell == self.player:
            return PLAYER_ON_TARGET if on_target else PLAYER
        if cell in self.boxes:
            return BOX_ON_TARGET if on_target else BOX
        return TARGET if on_target else FLOOR

    @classmethod
    def parse(cls, text: str) -> Level:
        """The level in an XSB text; raises LevelError naming the problem."""
        if len(text) > MAX_LEVEL_CHARS:
            raise LevelError(f"a level of {len(text)} characters is over {MAX_LEVEL_CHARS}")
        lines = text.replace("\r\n", "\n").split("\n")
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        if not lines:
            raise LevelError("the level is empty")
        height, width = len(lines), max(len(line) for line in lines)
        if height > MAX_SIDE or width > MAX_SIDE:
            raise LevelError(f"a {height}x{width} level is over {MAX_SIDE} cells a side")
        walls: set[Position] = set()
        targets: set[Position] = set()
        boxes: set[Position] = set()
        players: list[Position] = []
        for r, line in enumerate(lines):
            for c in range(width):
                char = line[c] if c < len(line) else WALL
                cell = (r, c)
                if char == WALL:
                    walls.add(cell)
                elif char in _FLOOR_ALIASES:
                    pass
                elif char in (TARGET, BOX_ON_TARGET, PLAYER_ON_TARGET):
                    targets.add(cell)
                elif char not in (BOX, PLAYER):
                    raise LevelError(f"unknown character {char!r} at row {r}, column {c}")
                if char in (BOX, BOX_ON_TARGET):
                    boxes.add(cell)
                if char in (PLAYER, PLAYER_ON_TARGET):
                    players.append(cell)
        if len(players) != 1:
            raise LevelError(f"a level has exactly one player (@ or +), this one {len(players)}")
        if not boxes:
            raise LevelError("the level has no box ($ or *)")
        if len(boxes) != len(targets):
            raise LevelError(f"the level has {len(boxes)} boxes but {len(targets)} targets")
        return cls(
            height, width, frozenset(walls), frozenset(targets), frozenset(boxes), players[0]
        )
