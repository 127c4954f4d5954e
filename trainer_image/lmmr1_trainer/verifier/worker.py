"""The verifier worker process: runs accuracy verifiers in its main thread.

math-verify bounds its own work with `signal.alarm`, which only works in a main thread, so
each worker is a process whose main thread does nothing else. The parent (pool.py) sends
`(sequence, AccuracyRequest)` over a pipe and reads `(sequence, AccuracyOutcome)` back; it
also enforces a wall-clock limit and kills the worker when math-verify's own timeout does not
fire (C code that never returns to the interpreter) or the worker crashes.

The pool's forkserver preloads this module, so a replacement worker starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import signal
import sys
from multiprocessing.connection import Connection

from lmmr1_trainer.verifier.config import AccuracySettings
from lmmr1_trainer.verifier.rewards import (
    AccuracyOutcome,
    AccuracyRequest,
    AccuracyStatus,
    load_verifiers,
    run_verification,
)

READY = "ready"
FAILED = "failed"
_PR_SET_PDEATHSIG = 1

# Import the built-in verifiers (and math-verify) at preload time, not per worker.
load_verifiers()


def _die_with_parent() -> None:
    # A worker stuck in C code would outlive a killed server; ask Linux to kill it.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _limit_memory(memory_mb: int | None) -> None:
    if memory_mb is None:
        return
    limit = memory_mb * 1024 * 1024
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _quiet_libraries() -> None:
    # math-verify logs the whole input on a timeout (100 kB responses): keep logs readable.
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _warm_up(settings: AccuracySettings) -> None:
    # The first parse loads the LaTeX grammar; do it before taking timed work.
    for task, text, label in (("math", "\\boxed{\\frac{1}{2}}", "0.5"), ("choice", "B", "B")):
        run_verification(AccuracyRequest(task, text, label, from_answer_block=True), settings)


def worker_main(
    connection: Connection,
    settings_json: str,
    plugins: tuple[str, ...],
    memory_mb: int | None,
) -> None:
    """Serve requests from the parent until it sends None or closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when workers stop
    _die_with_parent()
    _quiet_libraries()
    try:
        settings = AccuracySettings.model_validate_json(settings_json)
        load_verifiers(plugins)
        _warm_up(settings)
    except Exception as exc:  # e.g. a plug-in that does not import: tell the parent why
        connection.send((FAILED, f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    _limit_memory(memory_mb)
    connection.send((READY, os.getpid()))
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            break
        if message is None:
            break
        sequence, request = message
        outcome = run_verification(request, settings)
        try:
            connection.send((sequence, outcome))
        except OSError:
            break
        except Exception as exc:  # e.g. a plug-in returned something that cannot be pickled
            failure = AccuracyOutcome(0.0, AccuracyStatus.ERROR, detail=type(exc).__name__)
            connection.send((sequence, failure))
    connection.close()
    sys.exit(0)
