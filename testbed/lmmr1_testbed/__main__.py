"""Test-bed command line.

python -m lmmr1_testbed up        # build/reuse binaries, start everything (make cluster-up),
                                  # Kueue and JobSet included (--no-batch: without them)
python -m lmmr1_testbed down      # stop everything (make cluster-down)
python -m lmmr1_testbed status    # print the state of a running test bed as JSON
python -m lmmr1_testbed build     # only build/reuse the binaries
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from lmmr1_testbed import bed
from lmmr1_testbed.layout import PrerequisiteMissing, ensure_binaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmmr1_testbed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down", "status", "build"])
    parser.add_argument(
        "--no-batch",
        action="store_true",
        help="up: leave out the Kueue and JobSet controllers (and their build)",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            bed.up(with_batch=not args.no_batch)
        elif args.command == "down":
            bed.down()
        elif args.command == "build":
            print(ensure_binaries())
        else:
            state = bed.status()
            if state is None:
                print("testbed: not running", file=sys.stderr)
                return 1
            print(json.dumps(asdict(state), indent=2))
    except PrerequisiteMissing as err:
        print(f"testbed: {err}", file=sys.stderr)
        return 127
    except RuntimeError as err:
        print(f"testbed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
