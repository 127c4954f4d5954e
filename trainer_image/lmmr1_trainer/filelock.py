"""An advisory file lock for the processes of one pod (or node) that share a cache folder.

The ranks of a trainer pod share its cache emptyDir: without the lock each of a node's 8
ranks would download the same model at once (8 copies over the network, 7 thrown away).
`flock` locks die with their process, so a rank killed mid-download never leaves the
others waiting; the waiters then find no finished copy and one of them downloads it.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold the lock file `path` (created when missing) for the body of the `with`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process of this pod: %s", what)
            started = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            logger.info("waited %.1f s for %s", time.monotonic() - started, what)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
