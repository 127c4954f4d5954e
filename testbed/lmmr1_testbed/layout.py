"""Where the test bed keeps its binaries, state, logs and credentials."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "testbed" / "build.sh"


class PrerequisiteMissing(RuntimeError):
    """A tool the test bed needs is not installed; the message says what to install."""


def run_dir() -> Path:
    """The test bed's data directory: `$LMMR1_TESTBED_DIR`, else `<repo>/.testbed`."""
    return Path(os.environ.get("LMMR1_TESTBED_DIR", REPO_ROOT / ".testbed")).resolve()


def cache_dir() -> Path:
    """Where builds are cached across test beds and clones: `$LMMR1_CACHE`, else
    `~/.cache/lmmr1` (the same place testbed/build.sh and scripts/venv.sh use)."""
    return Path(os.environ.get("LMMR1_CACHE") or Path.home() / ".cache" / "lmmr1")


def build_binaries_in_background() -> subprocess.Popen[bytes] | None:
    """Start build.sh now, at a lower CPU priority, so that a cold machine builds the test
    bed (about 15 minutes on 2 cores) while the unit tests run, then the Kueue and JobSet
    controllers (`--batch`, about 25 minutes more) while the first integration tests run;
    `ensure_binaries` and `batch.ensure_binaries` wait on build.sh's locks and find
    everything built. Output: <cache>/testbed/build.log. None if the build could not be
    started (the foreground build will say why)."""
    log_path = cache_dir() / "testbed" / "build.log"
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            return subprocess.Popen(
                [
                    "nice",
                    "-n",
                    "10",
                    "bash",
                    "-c",
                    'bash "$0" && bash "$0" --batch',
                    str(BUILD_SCRIPT),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stopped as a group if the session ends first
            )
    except OSError:
        return None


def ensure_binaries() -> Path:
    """Build (or reuse from the cache) every binary; returns the directory that holds them.

    Progress lines from the build go to stderr as they come; a missing prerequisite
    (exit code 127) becomes a PrerequisiteMissing carrying build.sh's one-line message.
    """
    try:
        proc = subprocess.Popen(
            ["bash", str(BUILD_SCRIPT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except FileNotFoundError as err:
        raise PrerequisiteMissing("'bash' not found: install bash") from err
    assert proc.stderr is not None and proc.stdout is not None
    last_line = ""
    for line in proc.stderr:
        last_line = line.strip()
        if " not found: " not in line:
            sys.stderr.write(line)
    stdout = proc.stdout.read()
    if proc.wait() == 127:
        raise PrerequisiteMissing(last_line.removeprefix("testbed: "))
    if proc.returncode != 0:
        raise RuntimeError(f"testbed/build.sh failed with exit code {proc.returncode}")
    return Path(stdout.strip().splitlines()[-1])


@dataclass
class TestBedState:
    """What a running test bed looks like from outside; saved as `<run_dir>/state.json`."""

    __test__ = False  # not a pytest test class

    run_dir: str
    bin_dir: str
    apiserver_url: str
    kubeconfig: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_region: str = "us-east-1"
    mlflow_url: str = ""  # the MLflow tracking server (http://127.0.0.1:<port>)
    process_node: str = "lmmr1-process-node"
    gpu_nodes: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def state_file(self) -> Path:
        return Path(self.run_dir) / "state.json"

    def save(self) -> None:
        self.state_file.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> TestBedState | None:
        try:
            return cls(**json.loads((directory / "state.json").read_text()))
        except FileNotFoundError:
            return None

    def binary(self, name: str) -> str:
        return str(Path(self.bin_dir) / name)

    def s3_env(self) -> dict[str, str]:
        """The environment that points boto3 and the AWS CLI at the test bed's S3 server."""
        return {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_DEFAULT_REGION": self.s3_region,
        }

    def client_env(self) -> dict[str, str]:
        """Environment for kubectl/helm/boto3 subprocesses aimed at this test bed."""
        path = os.pathsep.join([self.bin_dir, os.environ.get("PATH", "")])
        return {"KUBECONFIG": self.kubeconfig, "PATH": path, **self.s3_env()}


def pod_log(
    state: TestBedState, namespace: str, pod: str, container: str, *, previous: bool = False
) -> str:
    """A container's output on the process node ('' before it has written any)."""
    name = f"{container}.previous.log" if previous else f"{container}.log"
    path = Path(state.run_dir) / "pods" / namespace / pod / name
    return path.read_text(errors="replace") if path.exists() else ""
