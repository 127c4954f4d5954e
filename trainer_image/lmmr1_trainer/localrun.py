"""Starting a stage's services as local processes (tests, the local demo): the verifier and
rollout servers, each on a free loopback port, with the URL each one prints once ready.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

CPU_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Service:
    process: subprocess.Popen[str]
    url: str
    lines: list[str] = field(default_factory=list)

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def start_service(
    argv: list[str], marker: str, env: dict[str, str] | None = None, within_s: float = 120.0
) -> Service:
    """Run `python -m …argv`, wait for a stdout line starting with `marker`, return its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **CPU_ENV, **(env or {})},
    )
    found: queue.Queue[str] = queue.Queue()
    lines: list[str] = []
    stdout = process.stdout
    assert stdout is not None

    def pump() -> None:
        for line in stdout:
            lines.append(line)
            if line.startswith(marker):
                found.put(line.split()[-1])

    threading.Thread(target=pump, daemon=True).start()
    try:
        url = found.get(timeout=within_s)
    except queue.Empty:
        process.kill()
        raise RuntimeError(f"{argv[0]} did not start:\n{''.join(lines[-40:])}") from None
    return Service(process, url, lines)


def start_verifier(
    host: str = "127.0.0.1", workers: int = 1, profile: str | None = None
) -> Service:
    """The verifier service; `profile` None: its default (lmm-r1, the reference)."""
    argv = ["lmmr1_trainer.verifier", "--host", host, "--port", "0", "--workers", str(workers)]
    if profile is not None:
        argv += ["--profile", profile]
    return start_service(argv, "lmmr1-verifier listening on ")


def start_rollout(
    config: Path, token_file: Path, host: str = "127.0.0.1", env: dict[str, str] | None = None
) -> Service:
    argv = [
        "lmmr1_trainer.rollout",
        "--host", host, "--port", "0", "--config", str(config),
        "--token-file", str(token_file), "--threads", "1",
    ]  # fmt: skip
    return start_service(argv, "lmmr1-rollout listening on ", env)
