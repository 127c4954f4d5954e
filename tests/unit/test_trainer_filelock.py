"""`filelock.exclusive`: the ranks of a pod take turns, and a holder that dies (SIGKILL,
mid-download) never leaves the others waiting. Real processes, a real lock file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

HOLDER = """
import sys, time
from pathlib import Path
from lmmr1_trainer.filelock import exclusive
lock, log, name, hold = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
with exclusive(lock, "the test's model"):
    with log.open("a") as out:
        out.write(f"{name} in\\n")
    print("holding", flush=True)
    time.sleep(hold)
    with log.open("a") as out:
        out.write(f"{name} out\\n")
"""


def start(tmp_path: Path, name: str, hold: float) -> subprocess.Popen[str]:
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent(HOLDER))
    args = [str(tmp_path / "lock"), str(tmp_path / "log"), name, str(hold)]
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True)


def test_processes_take_turns(tmp_path: Path) -> None:
    first = start(tmp_path, "a", hold=2.0)
    assert first.stdout is not None and first.stdout.readline() == "holding\n"
    others = [start(tmp_path, name, hold=0.2) for name in ("b", "c")]
    for process in (first, *others):
        assert process.wait(timeout=60) == 0
    lines = (tmp_path / "log").read_text().splitlines()
    # Never two inside at once: every "in" is followed by its own "out".
    assert [line.split()[1] for line in lines] == ["in", "out"] * 3, lines
    assert [line.split()[0] for line in lines[::2]] == [line.split()[0] for line in lines[1::2]]
    assert lines[:2] == ["a in", "a out"]


def test_a_killed_holder_releases_the_lock(tmp_path: Path) -> None:
    holder = start(tmp_path, "a", hold=600.0)
    assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
    waiter = start(tmp_path, "b", hold=0.0)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert waiter.wait(timeout=60) == 0
    assert (tmp_path / "log").read_text().splitlines() == ["a in", "b in", "b out"]
