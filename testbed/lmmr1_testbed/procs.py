"""Background processes of the test bed: start detached, record pid files, stop cleanly.

Each component runs in its own session (process group) with its output in a log file, so
`make cluster-up` can return while the components keep running, and `make cluster-down`
(or the pytest fixture) finds them again by pid file and stops the whole group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def start(
    name: str,
    argv: Sequence[str],
    *,
    run_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start `argv` detached; its output goes to `run_dir/logs/<name>.log`. Returns the pid."""
    logs = run_dir / "logs"
    pids = run_dir / "pids"
    logs.mkdir(parents=True, exist_ok=True)
    pids.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    (pids / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def pid_of(name: str, run_dir: Path) -> int | None:
    path = run_dir / "pids" / f"{name}.pid"
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return _state(pid) not in ("Z", "X", None)


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def stop(name: str, run_dir: Path, *, grace: float = 10.0) -> bool:
    """SIGTERM the component's process group, SIGKILL after `grace` s. True if it was running."""
    pid = pid_of(name, run_dir)
    (run_dir / "pids" / f"{name}.pid").unlink(missing_ok=True)
    if pid is None or not is_alive(pid):
        return False
    kill_group(pid, grace=grace)
    return True


def kill_group(pid: int, *, grace: float, alive: Callable[[], bool] | None = None) -> None:
    """Terminate the process group led by `pid`, escalating to SIGKILL after `grace` s.

    `alive` tells whether the leader still runs; pass `lambda: popen.poll() is None` for a
    child of ours, so its exit status stays with its Popen instead of being reaped here.
    """
    alive = alive or (lambda: is_alive(pid))
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not alive():
            break
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file ('' when it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
