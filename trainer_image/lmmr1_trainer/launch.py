"""python -m lmmr1_trainer.launch [torchrun arguments] -m lmmr1_trainer.train --config FILE

torchrun that keeps configuration errors. torchrun ends with exit 1 whatever its workers
exited with, so a rank's exit 78 (EX_CONFIG: retrying cannot help, the operator fails the
run at once) would read as a crash and be retried `backoffLimit` times. This launcher runs
torchrun (`torch.distributed.run`, in this process) with `$LMMR1_EXIT_DIR` set to a fresh
directory. A rank that rejects its configuration calls `config_error(message)`, which writes
`rank-<RANK>.exit` there (JSON: rank, code, message) before the rank exits 78. When torchrun
fails and a rank reported a configuration error (or exited 78 without a word), the launcher
exits 78 with that rank's message in the container's termination message file
(`$LMMR1_TERMINATION_LOG`, default /dev/termination-log), where the operator reads it.
Anything else exits as torchrun would.

Outside the launcher (a single trainer process, the rollout server, the verifier),
`config_error` writes the termination message itself. This module imports torch only to
launch, so every entry point can use `config_error`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmmr1_trainer.config import EXIT_CONFIG_ERROR, TERMINATION_LOG

TERMINATION_LOG_ENV = "LMMR1_TERMINATION_LOG"
EXIT_DIR_ENV = "LMMR1_EXIT_DIR"
# The kubelet keeps at most 4096 bytes of a container's termination message.
MAX_MESSAGE_BYTES = 4096
logger = logging.getLogger("lmmr1_trainer.launch")


@dataclass(frozen=True)
class RankExit:
    rank: int
    code: int
    message: str


def termination_log() -> Path:
    return Path(os.environ.get(TERMINATION_LOG_ENV) or TERMINATION_LOG)


def write_termination_message(text: str) -> bool:
    """Best effort. The default path is written only where it exists (the kubelet mounts it
    into every container): outside a pod nothing appears in /dev."""
    path = termination_log()
    if not os.environ.get(TERMINATION_LOG_ENV) and not path.exists():
        logger.info("no termination message (%s does not exist)", path)
        return False
    data = text.encode()[:MAX_MESSAGE_BYTES].decode(errors="ignore").encode()
    try:
        path.write_bytes(data)
    except OSError as err:
        logger.info("no termination message (%s: %s)", path, err)
        return False
    return True


def config_error(message: str) -> int:
    """Report a configuration error the way the operator reads it; returns 78 to exit with.

    Under the launcher the rank's report goes to `$LMMR1_EXIT_DIR` (the launcher writes the
    termination message once every rank has stopped); otherwise to the termination message.
    """
    print(f"error: {message}", file=sys.stderr, flush=True)
    directory = os.environ.get(EXIT_DIR_ENV)
    if directory:
        rank = int(os.environ.get("RANK", "0"))
        record = {"rank": rank, "code": EXIT_CONFIG_ERROR, "message": message}
        path = Path(directory) / f"rank-{rank}.exit"
        try:
            partial = path.with_suffix(".partial")
            partial.write_text(json.dumps(record))
            partial.replace(path)
            return EXIT_CONFIG_ERROR
        except OSError as err:
            print(f"cannot report to the launcher ({path}: {err})", file=sys.stderr)
    write_termination_message(message)
    return EXIT_CONFIG_ERROR


def reported(directory: Path) -> list[RankExit]:
    """The ranks' reports, lowest rank first (unreadable ones are skipped)."""
    out = []
    for path in directory.glob("rank-*.exit"):
        try:
            record = json.loads(path.read_text())
            out.append(RankExit(int(record["rank"]), int(record["code"]), str(record["message"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(out, key=lambda r: r.rank)


def _torchrun(argv: Sequence[str]) -> tuple[int, dict[int, int]]:
    """torchrun's exit status and, when it failed, each failed rank's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    torchrun: Any = importlib.import_module("torch.distributed.run")  # untyped
    try:
        torchrun.run(torchrun.parse_args(list(argv)))
    except ChildFailedError as err:
        return 1, {rank: failure.exitcode for rank, failure in err.failures.items()}
    except SignalException as err:  # SIGTERM from the kubelet: the workers are stopped
        return 128 + int(err.sigval), {}
    return 0, {}


def outcome(status: int, failures: dict[int, int], reports: list[RankExit]) -> tuple[int, str]:
    """The launcher's exit code and termination message from what torchrun and the ranks
    said: a configuration error on any rank wins over the other ranks' failures (they were
    stopped because of it, or failed on the same bad setting)."""
    if status == 0:
        return 0, ""
    for report in reports:
        if report.code == EXIT_CONFIG_ERROR:
            return EXIT_CONFIG_ERROR, f"rank {report.rank}: {report.message}"
    for rank, code in sorted(failures.items()):
        if code == EXIT_CONFIG_ERROR:
            return EXIT_CONFIG_ERROR, (
                f"rank {rank} exited {EXIT_CONFIG_ERROR} (configuration error); see its log"
            )
    return status, ""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    directory = Path(tempfile.mkdtemp(prefix="lmmr1-exit-"))
    previous = os.environ.get(EXIT_DIR_ENV)
    os.environ[EXIT_DIR_ENV] = str(directory)  # torchrun's workers inherit it
    try:
        status, failures = _torchrun(args)
        code, message = outcome(status, failures, reported(directory))
    finally:
        if previous is None:
            os.environ.pop(EXIT_DIR_ENV, None)
        else:
            os.environ[EXIT_DIR_ENV] = previous
        shutil.rmtree(directory, ignore_errors=True)
    if message:
        print(f"lmmr1-launch: configuration error, exit {code}: {message}", file=sys.stderr)
        write_termination_message(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
