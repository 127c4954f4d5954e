"""What a benchmark ran on, in the words every section of docs/benchmarks.md uses."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_machine() -> str:
    """Cores, CPU model, memory and OS, e.g. `2 cores (Intel Xeon), 24 GiB, Linux-6.1-…`."""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu_model()}), {mem_gib:.0f} GiB, {platform.platform()}"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how much else was running."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())
