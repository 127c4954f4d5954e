"""A level as a PNG frame, drawn with Pillow in the look the prompt describes: a green
character, yellow boxes, targets marked by a red dot (gym-sokoban's sprites, redrawn as
shapes at any size). Brick-coloured walls, grey floor; the red dot is drawn last, so a box
or the player on a target still shows it.
"""

from __future__ import annotations

import io
from typing import Any

from lmmr1_trainer.tasks.sokoban.level import Level, Position

WALL_COLOUR = (130, 64, 40)
MORTAR_COLOUR = (90, 44, 28)
FLOOR_COLOUR = (205, 205, 205)
TARGET_COLOUR = (220, 30, 30)
BOX_COLOUR = (240, 200, 30)
BOX_EDGE_COLOUR = (150, 110, 10)
PLAYER_COLOUR = (30, 170, 60)
PLAYER_EDGE_COLOUR = (10, 90, 30)


def _cell_box(cell: Position, tile: int, inset: float = 0.0) -> tuple[int, int, int, int]:
    top, left = cell[0] * tile, cell[1] * tile
    pad = int(tile * inset)
    return left + pad, top + pad, left + tile - 1 - pad, top + tile - 1 - pad


def _dot(draw: Any, cell: Position, tile: int) -> None:
    draw.ellipse(_cell_box(cell, tile, 0.38), fill=TARGET_COLOUR)


def render_level(level: Level, tile_px: int) -> Any:
    """The level as an RGB PIL image, `tile_px` pixels a cell."""
    from PIL import Image, ImageDraw

    if tile_px < 4:
        raise ValueError(f"tile_px must be at least 4, got {tile_px}")
    image = Image.new("RGB", (level.width * tile_px, level.height * tile_px), FLOOR_COLOUR)
    draw = ImageDraw.Draw(image)
    edge = max(1, tile_px // 12)
    for r in range(level.height):
        for c in range(level.width):
            cell = (r, c)
            if cell in level.walls:
                draw.rectangle(_cell_box(cell, tile_px), fill=WALL_COLOUR)
                x0, y0, x1, y1 = _cell_box(cell, tile_px)
                middle = (y0 + y1) // 2
                draw.line((x0, middle, x1, middle), fill=MORTAR_COLOUR, width=edge)
                draw.rectangle((x0, y0, x1, y1), outline=MORTAR_COLOUR, width=edge)
                continue
            draw.rectangle(_cell_box(cell, tile_px), outline=(185, 185, 185), width=1)
            if cell in level.boxes:
                draw.rectangle(
                    _cell_box(cell, tile_px, 0.1),
                    fill=BOX_COLOUR,
                    outline=BOX_EDGE_COLOUR,
                    width=edge,
                )
            if cell == level.player:
                draw.ellipse(
                    _cell_box(cell, tile_px, 0.15),
                    fill=PLAYER_COLOUR,
                    outline=PLAYER_EDGE_COLOUR,
                    width=edge,
                )
            if cell in level.targets:
                _dot(draw, cell, tile_px)
    return image


def render_png(level: Level, tile_px: int) -> bytes:
    buffer = io.BytesIO()
    render_level(level, tile_px).save(buffer, format="PNG")
    return buffer.getvalue()
