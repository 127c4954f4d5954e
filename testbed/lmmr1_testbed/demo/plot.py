"""A reward curve as a PNG, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 360, 50


def reward_curve(points: list[tuple[int, float]], title: str, path: Path) -> None:
    """`points` are (step, mean reward); writes `path`."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 12), title, fill="black")
    left, top, right, bottom = MARGIN, MARGIN, WIDTH - 20, HEIGHT - MARGIN
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    if points:
        steps = [s for s, _ in points]
        rewards = [r for _, r in points]
        lo, hi = min(0.0, *rewards), max(1.5, *rewards)
        first, last = min(steps), max(steps)
        span = max(last - first, 1)

        def xy(step: int, reward: float) -> tuple[float, float]:
            x = left + (step - first) / span * (right - left)
            y = bottom - (reward - lo) / (hi - lo) * (bottom - top)
            return x, y

        for tick in (lo, (lo + hi) / 2, hi):
            _, y = xy(first, tick)
            draw.line([(left - 4, y), (left, y)], fill="black")
            draw.text((4, y - 6), f"{tick:.2f}", fill="black")
        draw.text((left, bottom + 8), f"step {first}", fill="black")
        draw.text((right - 60, bottom + 8), f"step {last}", fill="black")
        line = [xy(s, r) for s, r in points]
        if len(line) > 1:
            draw.line(line, fill=(31, 119, 180), width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
