"""python -m lmmr1_trainer.tasks.sokoban generate --out DIR_OR_S3_URI --count 10000 --seed 0

Writes a Sokoban dataset for the `sokoban` verifier: `train.jsonl` (rows in the project's
format, the level as the label) and `images/*.png`. By default half the levels have 2 boxes
and half 3, in 7x7 rooms, like the reference's Sokoban-small-v0 and -v1 mix, with frames
640 pixels high like the reference's. The same arguments always give the same dataset.

`solve --level FILE` prints a shortest solution of an XSB level (`-` reads standard input).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lmmr1_trainer.config import S3Settings
from lmmr1_trainer.tasks.sokoban.dataset import write_dataset
from lmmr1_trainer.tasks.sokoban.generate import REPLAY_LIMIT, GenerationError, LevelSpec
from lmmr1_trainer.tasks.sokoban.level import Level, LevelError
from lmmr1_trainer.tasks.sokoban.solver import solve


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lmmr1_trainer.tasks.sokoban",
        description="Generate Sokoban datasets (levels, frames, rows) or solve a level.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="write a dataset")
    add = generate.add_argument
    add("--out", required=True, help="a directory or s3://bucket/prefix")
    add("--count", type=_positive, default=64, help="levels (default 64)")
    add("--seed", type=int, default=0, help="the generator's seed (default 0)")
    add("--size", type=_positive, default=7, help="rows and columns of a room (default 7)")
    add(
        "--boxes",
        type=_positive,
        nargs="+",
        default=[2, 3],
        help="boxes per level, cycled row by row (default 2 3: the reference's mix)",
    )
    add("--min-moves", type=_positive, default=1, help="shortest solution at least (default 1)")
    add(
        "--max-moves",
        type=_positive,
        default=REPLAY_LIMIT,
        help=f"shortest solution at most (default {REPLAY_LIMIT}, the reward's replay limit)",
    )
    add("--image-height", type=_positive, default=640, help="frame height in pixels (640)")
    add("--s3-endpoint", default=None)
    add("--s3-region", default=None)
    solver = commands.add_parser("solve", help="print a shortest solution of an XSB level")
    solver.add_argument("--level", required=True, help="an XSB file, or - for standard input")
    return parser


def _generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        specs = [
            LevelSpec(
                height=args.size,
                width=args.size,
                boxes=boxes,
                min_solution_moves=args.min_moves,
                max_solution_moves=args.max_moves,
            )
            for boxes in args.boxes
        ]
    except ValueError as exc:
        parser.error(str(exc))
    settings = S3Settings(endpoint=args.s3_endpoint, region=args.s3_region)
    try:
        uri = write_dataset(args.out, args.count, args.seed, specs, args.image_height, settings)
    except GenerationError as exc:
        print(f"error: {exc}; loosen --min-moves/--max-moves or change --size", file=sys.stderr)
        return 1
    print(f"wrote {args.count} Sokoban levels to {uri}")
    return 0


def _solve(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.level == "-" else Path(args.level).read_text()
    try:
        level = Level.parse(text)
    except LevelError as exc:
        print(f"error: {args.level}: {exc}", file=sys.stderr)
        return 1
    result = solve(level)
    if result.moves is None:
        reason = "unsolvable" if result.exhausted else f"not solved in {result.states} states"
        print(f"error: {reason}", file=sys.stderr)
        return 1
    print(", ".join(move.word for move in result.moves))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        return _generate(args, parser)
    return _solve(args)


if __name__ == "__main__":
    sys.exit(main())
