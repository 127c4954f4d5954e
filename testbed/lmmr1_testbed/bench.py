"""Measure the test bed: binary build time (cold with COLD=1), warm start time, memory.

    make bench                 # warm start + memory, appended to docs/benchmarks.md
    COLD=1 make bench          # also a cold build into an empty cache (many minutes)

A warm start is `up` with every binary cached: it measures how long until the control plane
answers /readyz, until every component (kwok nodes Ready, S3, process node) is up, and the
resident memory of all test-bed processes once idle for 10 s.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import tempfile
import time
from pathlib import Path

from lmmr1_testbed import bed, procs
from lmmr1_testbed.layout import BUILD_SCRIPT, REPO_ROOT, ensure_binaries, run_dir
from lmmr1_trainer.machine import describe_machine

RESULTS = REPO_ROOT / "docs" / "benchmarks.md"


def _tree_rss_kib(pid: int) -> int:
    """Resident memory of `pid` and all its descendants, in KiB."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
        stack.extend(int(child) for child in children)
    return total


def main() -> None:
    lines = []
    if os.environ.get("COLD"):
        with tempfile.TemporaryDirectory() as cache:
            gocache = Path(cache) / "go-build"
            start = time.monotonic()
            subprocess.run(
                ["bash", str(BUILD_SCRIPT)],
                check=True,
                env={**os.environ, "LMMR1_CACHE": cache, "GOCACHE": str(gocache)},
            )
            lines.append(
                f"| cold build of every binary (empty build cache, modules cached) "
                f"| {time.monotonic() - start:.0f} s |"
            )
    bed.down(quiet=True)
    start = time.monotonic()
    ensure_binaries()
    cached = time.monotonic() - start
    start = time.monotonic()
    bed.up()
    total = time.monotonic() - start
    readyz = _first_ready_seconds()
    time.sleep(10)
    directory = run_dir()
    memory = {}
    for name in bed.COMPONENTS:
        pid = procs.pid_of(name, directory)
        memory[name] = _tree_rss_kib(pid) / 1024 if pid else 0.0
    bed.down(quiet=True)
    lines += [
        f"| build step with every binary cached | {cached:.1f} s |",
        f"| warm start: kube-apiserver /readyz after launch | {readyz:.1f} s |",
        f"| warm start: whole test bed up (nodes Ready, S3, process node) | {total:.1f} s |",
        f"| resident memory, all components, idle | {sum(memory.values()):.0f} MiB |",
        *(f"| &nbsp;&nbsp;{name} | {mib:.0f} MiB |" for name, mib in memory.items()),
    ]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join(
        [
            f"\n### Test bed, {stamp}\n",
            f"Machine: {describe_machine()}. Command: `make bench`"
            + (" with `COLD=1`" if os.environ.get("COLD") else "")
            + ".\n",
            "| what | measured |",
            "|---|---|",
            *lines,
            "",
        ]
    )
    RESULTS.parent.mkdir(exist_ok=True)
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmarks\n\nEvery number here was measured by the command "
            "named beside it, on the machine named beside it.\n"
        )
    with RESULTS.open("a") as out:
        out.write(section)
    print(section)


def _first_ready_seconds() -> float:
    """Seconds from the apiserver's launch (its pid file) to `up` seeing /readyz answer."""
    directory = run_dir()
    launched = (directory / "pids" / "kube-apiserver.pid").stat().st_mtime
    return (directory / "apiserver-ready").stat().st_mtime - launched


if __name__ == "__main__":
    main()
